local ttl = ARGV[#ARGV]
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('PEXPIRE', key, ttl)
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
