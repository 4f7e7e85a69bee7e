-- KEYS: lease, holders, spread, held. ARGV: the lease's value (replica:token), the mailbox's
-- id, the replica.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HINCRBY', KEYS[4], ARGV[3], -1)
  if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
  redis.call('INCR', KEYS[3])
end
return 1
