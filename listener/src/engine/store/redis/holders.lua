-- KEYS: replicas, holders. Answers mailbox, replica, ... for every lease a live replica holds.
local live = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')) do
  live[r] = true
end
local all = redis.call('HGETALL', KEYS[2])
local held = {}
for i = 1, #all, 2 do
  local r = holder_of(all[i + 1])
  if r and live[r] then
    held[#held + 1] = all[i]
    held[#held + 1] = r
  end
end
return held
