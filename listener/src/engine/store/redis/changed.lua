-- KEYS: spread, changelog. ARGV: a spread version, the changelog's length.
-- Answers {'1', ids...}: the mailboxes given a new generation since that version; or {'0'} when
-- the changelog does not reach back that far (or the version is not this Redis's).
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
if since > now or since < now - tonumber(ARGV[2]) then return {'0'} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf')
table.insert(ids, 1, '1')
return ids
