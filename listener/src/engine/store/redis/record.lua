local held = redis.call('GET', KEYS[4]) == ARGV[8]
local function answer(ok)
  if held then return ok end
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 then return answer(0) end
redis.call('LREM', KEYS[5], 0, ARGV[9])
if redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1]) == 0 then return answer(0) end
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1) end
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
redis.call('HSET', KEYS[1], 'updated_ms', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[6], 'last_error_ms', ARGV[2])
  if redis.call('RPUSH', KEYS[3], ARGV[5]) > tonumber(ARGV[7]) then
    redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
    return answer(2)
  end
end
return answer(1)
