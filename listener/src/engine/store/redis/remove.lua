local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[5], ARGV[1])
return existed
