-- KEYS: mbx, lease, states (state -> how many mailboxes are in it).
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return 0 end
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[4] then return -1 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_ms', ARGV[3])
if old ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[3], old, -1)
  redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[2], 'last_error', ARGV[2], 'last_error_ms', ARGV[3])
end
if ARGV[1] == 'Streaming' then
  redis.call('HDEL', KEYS[1], 'error', 'unhealthy_since_ms')
elseif redis.call('HEXISTS', KEYS[1], 'unhealthy_since_ms') == 0 then
  redis.call('HSET', KEYS[1], 'unhealthy_since_ms', ARGV[3])
end
return 1
