if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local job = redis.call('HMGET', KEYS[1], 'history_since', 'history_offset', 'history_done',
  'history_total')
if not job[1] or tonumber(job[1]) > tonumber(ARGV[1]) then
  job = {ARGV[1], '0', '0', '0'}
  redis.call('HSET', KEYS[1], 'history_since', job[1], 'history_offset', 0, 'history_done', 0,
    'history_total', 0)
end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {tonumber(job[1]), tonumber(job[2]), tonumber(job[3]), tonumber(job[4])}
