local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local alive = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= ARGV[3] and alive > now then
  return redis.error_reply('DUPLICATE another process is alive as this replica')
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
