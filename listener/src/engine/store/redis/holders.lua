-- KEYS: replicas, holders. Answers mailbox, replica, ... for every lease a live replica holds.
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local alive = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do alive[r] = true end
local all = redis.call('HGETALL', KEYS[2])
local held = {}
for i = 1, #all, 2 do
  local r = string.match(all[i + 1], '^(.*):%d+$')
  if r and alive[r] then
    held[#held + 1] = all[i]
    held[#held + 1] = r
  end
end
return held
