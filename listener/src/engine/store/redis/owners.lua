-- KEYS: replicas, then each mailbox's lease. Answers each lease's holder while it is alive.
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local alive = {}
local owners = {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local r = v and string.match(v, '^(.*):%d+$')
  if r and alive[r] == nil then
    alive[r] = tonumber(redis.call('ZSCORE', KEYS[1], r) or '0') > now
  end
  if r and alive[r] then owners[i - 1] = r else owners[i - 1] = '' end
end
return owners
