local now = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'written_back') ~= '1' or redis.call('EXISTS', KEYS[5]) == 1 then
    return 0
  end
  local theirs = tonumber(redis.call('HGET', KEYS[1], 'sync_at_ms') or '0') or 0
  if tonumber(ARGV[6]) <= theirs then return 0 end
else
  local g = redis.call('INCR', KEYS[3])
  if g < now then
    g = now
    redis.call('SET', KEYS[3], g)
  end
  redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'creds', ARGV[3], 'gen', g, 'state', 'Starting',
    'unhealthy_since_ms', ARGV[4], 'updated_ms', ARGV[4], 'written_back', '1')
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[7])
  redis.call('HINCRBY', KEYS[8], 'Starting', 1)
  redis.call('PUBLISH', KEYS[6], ARGV[1])
end
redis.call('HSET', KEYS[1], 'sync_state', ARGV[5], 'sync_at_ms', ARGV[6], 'sync_phase', ARGV[7],
  'sync_since_ms', ARGV[8])
for i = 9, #ARGV, 2 do
  redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i])
end
return 1
