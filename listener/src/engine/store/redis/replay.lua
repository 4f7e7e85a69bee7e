if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local letters = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
for _, entry in ipairs(letters) do
  local digest, item = string.match(entry, '^([^\n]*)\n([^\n]*)\n')
  if digest then
    redis.call('ZREM', KEYS[2], digest)
    redis.call('LREM', KEYS[4], 0, item)
    redis.call('RPUSH', KEYS[4], item)
  end
end
redis.call('PUBLISH', KEYS[5], ARGV[1])
return #letters
