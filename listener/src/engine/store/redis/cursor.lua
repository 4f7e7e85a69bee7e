if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sync_state', ARGV[2], 'sync_at_ms', ARGV[3], 'sync_phase', ARGV[4],
  'sync_since_ms', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
end
return 1
