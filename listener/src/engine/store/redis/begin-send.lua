local now = now_ms()
local v = redis.call('GET', KEYS[1])
if v == 'sent' then return 'sent' end
local answer = 'new'
if v then
  local since = tonumber(string.sub(v, 9)) or 0
  if now - since < tonumber(ARGV[2]) then return 'busy' end
  answer = 'stale'
end
redis.call('SET', KEYS[1], 'sending:' .. now, 'PX', ARGV[1])
return answer
