-- KEYS: replicas, then each mailbox's lease. Answers each lease's holder while it is alive.
local now = now_ms()
local owners = {}
for i = 2, #KEYS do
  local r = holder_of(redis.call('GET', KEYS[i]))
  if r and alive(KEYS[1], r, now) then owners[i - 1] = r else owners[i - 1] = '' end
end
return owners
