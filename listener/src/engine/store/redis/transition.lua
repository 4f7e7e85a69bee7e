if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[4] then return -1 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_ms', ARGV[3])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[2], 'last_error', ARGV[2], 'last_error_ms', ARGV[3])
end
if ARGV[1] == 'Streaming' then
  redis.call('HDEL', KEYS[1], 'error', 'unhealthy_since_ms')
elseif redis.call('HEXISTS', KEYS[1], 'unhealthy_since_ms') == 0 then
  redis.call('HSET', KEYS[1], 'unhealthy_since_ms', ARGV[3])
end
return 1
