-- KEYS: mbx, open, generation, seen, replay, changes, spread, states, changelog.
-- ARGV: id, fingerprint, sealed credentials, now, changelog length.
local fp = redis.call('HGET', KEYS[1], 'fp')
if fp == ARGV[2] then return 0 end
local old = redis.call('HGET', KEYS[1], 'state')
if old then redis.call('HINCRBY', KEYS[8], old, -1) end
redis.call('HINCRBY', KEYS[8], 'Starting', 1)
local g = redis.call('INCR', KEYS[3])
if g < tonumber(ARGV[4]) then
  -- Never below the clock: a Redis that lost its data gives no generation twice.
  g = tonumber(ARGV[4])
  redis.call('SET', KEYS[3], g)
end
if fp then
  redis.call('HDEL', KEYS[1], 'error', 'last_error', 'last_error_ms', 'reconnects')
else
  -- A new mailbox: list the inbox, then deliver what arrived since now (SyncCursor::new_mailbox).
  redis.call('DEL', KEYS[4], KEYS[5])
  redis.call('HSET', KEYS[1], 'sync_phase', 'baseline', 'sync_since_ms', ARGV[4], 'sync_at_ms', ARGV[4])
end
redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'creds', ARGV[3], 'gen', g, 'state', 'Starting',
  'unhealthy_since_ms', ARGV[4], 'updated_ms', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
-- The changelog: which mailbox got a new generation at which spread version, the last
-- ARGV[5] versions of it.
local v = redis.call('INCR', KEYS[7])
redis.call('ZADD', KEYS[9], v, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', v - tonumber(ARGV[5]))
redis.call('PUBLISH', KEYS[6], ARGV[1])
return g
