-- Put before the scripts that read the time or a lease (see `redis.rs`): Redis's own clock,
-- the replica a lease value (`replica:token`) names, and whether a replica is alive by
-- `el:replicas`, asked once a script.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function holder_of(lease)
  return lease and string.match(lease, '^(.*):%d+$')
end

local alive_seen = {}
local function alive(replicas, r, now)
  if alive_seen[r] == nil then
    alive_seen[r] = tonumber(redis.call('ZSCORE', replicas, r) or '0') > now
  end
  return alive_seen[r]
end

