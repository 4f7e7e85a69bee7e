if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'history_since') ~= ARGV[2] then return 0 end
if ARGV[3] then
  redis.call('HSET', KEYS[1], 'history_folder', ARGV[3], 'history_offset', ARGV[4],
    'history_done', ARGV[5], 'history_total', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'history_since', 'history_folder', 'history_offset',
    'history_done', 'history_total')
end
return 1
