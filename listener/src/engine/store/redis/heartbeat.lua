-- KEYS: replicas (zset: replica -> alive until, ms), replica-process (hash: replica -> nonce),
-- spread (the spread's version). ARGV: replica, ttl ms, nonce, 1 when this replica's commands
-- moved to another master since its last heartbeat (else 0).
-- Answers {unbroken, version, live replicas}.
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= ARGV[3] and deadline > now then
  return redis.error_reply('DUPLICATE another process is alive as this replica')
end
local unbroken = 0
if holder == ARGV[3] and deadline > now then unbroken = 1 end
if holder ~= ARGV[3] then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
local joined = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local version
if joined + gone > 0 or ARGV[4] == '1' then
  version = redis.call('INCR', KEYS[3])
else
  version = tonumber(redis.call('GET', KEYS[3]) or '0')
end
return {unbroken, version, redis.call('ZRANGE', KEYS[1], 0, -1)}
