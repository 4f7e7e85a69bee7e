-- KEYS: mbx, open set, seen, replay, changes channel, lease, replicas, holders, spread,
-- states, held. ARGV: the mailbox's id.
local old = redis.call('HGET', KEYS[1], 'state')
if old then redis.call('HINCRBY', KEYS[10], old, -1) end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
-- A live holder gives its lease back once its worker has stopped; a dead one never would.
local v = redis.call('GET', KEYS[6])
if v then
  local r = holder_of(v)
  if not (r and alive(KEYS[7], r, now_ms())) then
    redis.call('DEL', KEYS[6])
    redis.call('HDEL', KEYS[8], ARGV[1])
    if r then redis.call('HINCRBY', KEYS[11], r, -1) end
  end
end
redis.call('INCR', KEYS[9])
redis.call('PUBLISH', KEYS[5], ARGV[1])
return existed
