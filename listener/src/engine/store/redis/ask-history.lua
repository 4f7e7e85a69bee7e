if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local job = redis.call('HMGET', KEYS[1], 'history_since', 'history_folder', 'history_offset',
  'history_done', 'history_total')
if not job[1] or tonumber(job[1]) > tonumber(ARGV[1]) then
  job = {ARGV[1], '0', '0', '0', '0'}
  redis.call('HSET', KEYS[1], 'history_since', job[1], 'history_folder', 0, 'history_offset', 0,
    'history_done', 0, 'history_total', 0)
end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {tonumber(job[1]), tonumber(job[2] or 0), tonumber(job[3]), tonumber(job[4]),
  tonumber(job[5])}
