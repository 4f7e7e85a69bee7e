-- KEYS: replicas, holders, spread, held (replica -> leases it holds), then each mailbox's
-- lease and fence.
-- ARGV: replica, then each mailbox's id.
-- A lease is free when no one holds it, when its holder is not alive, or when this replica
-- holds it under a token it no longer acts on. Answers each new token, or 0 (all 0 while the
-- claimer itself is not alive).
local now = now_ms()
local tokens = {}
-- A claimer that is not alive (gone from a Redis that lost its data, or its heartbeat late)
-- takes nothing: what it took could be taken from it at once.
if not alive(KEYS[1], ARGV[1], now) then
  for _ = 5, #KEYS, 2 do tokens[#tokens + 1] = 0 end
  return tokens
end
local taken = 0
local n = 1
for i = 5, #KEYS, 2 do
  n = n + 1
  local lease, fence, id = KEYS[i], KEYS[i + 1], ARGV[n]
  local r = holder_of(redis.call('GET', lease))
  local free = not r or r == ARGV[1] or not alive(KEYS[1], r, now)
  if free then
    if r then redis.call('HINCRBY', KEYS[4], r, -1) end
    redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
    local t = redis.call('INCR', fence)
    if t < now then
      -- Never below the clock: a Redis that lost its data gives no token twice.
      t = now
      redis.call('SET', fence, t)
    end
    local value = ARGV[1] .. ':' .. t
    redis.call('SET', lease, value)
    redis.call('HSET', KEYS[2], id, value)
    tokens[#tokens + 1] = t
    taken = taken + 1
  else
    tokens[#tokens + 1] = 0
  end
end
if taken > 0 then redis.call('INCR', KEYS[3]) end
return tokens
