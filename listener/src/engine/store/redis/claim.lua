local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local tokens = {}
for i = 1, #KEYS, 2 do
  local lease, fence = KEYS[i], KEYS[i + 1]
  local v = redis.call('GET', lease)
  if v then
    local r, t = string.match(v, '^(.*):(%d+)$')
    if r == ARGV[1] then
      redis.call('PEXPIRE', lease, ARGV[2])
      tokens[#tokens + 1] = tonumber(t)
    else
      tokens[#tokens + 1] = 0
    end
  else
    local t = redis.call('INCR', fence)
    if t < now then
      -- Never below the clock: a Redis that lost its data gives no token twice.
      t = now
      redis.call('SET', fence, t)
    end
    redis.call('SET', lease, ARGV[1] .. ':' .. t, 'PX', ARGV[2])
    tokens[#tokens + 1] = t
  end
end
return tokens
