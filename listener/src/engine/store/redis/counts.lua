-- KEYS: states (state -> mailboxes in it), held (replica -> leases it holds), open, replicas,
-- holders (mailbox -> replica:token).
-- ARGV: the key prefix, how old the counts may be (ms) before they are made again.
-- Answers {states pairs, held pairs of live replicas}. The counts are kept by every script
-- that moves a state or a lease; they are made again from every mailbox when missing (a
-- Redis that lost its data, an older version's keys) and once per ARGV[2] as a net.
local now = now_ms()
local at = tonumber(redis.call('HGET', KEYS[1], '_counted_ms') or '0')
if now - at > tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1], KEYS[2])
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local state = redis.call('HGET', ARGV[1] .. 'mbx:{' .. id .. '}', 'state')
    if state then redis.call('HINCRBY', KEYS[1], state, 1) end
  end
  local leases = redis.call('HVALS', KEYS[5])
  for _, v in ipairs(leases) do
    local r = holder_of(v)
    if r then redis.call('HINCRBY', KEYS[2], r, 1) end
  end
  redis.call('HSET', KEYS[1], '_counted_ms', now)
end
local states = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= '_counted_ms' and tonumber(all[i + 1]) > 0 then
    states[#states + 1] = all[i]
    states[#states + 1] = all[i + 1]
  end
end
local held = {}
local alive = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf')) do alive[r] = true end
all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if alive[all[i]] and tonumber(all[i + 1]) > 0 then
    held[#held + 1] = all[i]
    held[#held + 1] = all[i + 1]
  end
end
return {states, held}
