local gens = {}
for i, key in ipairs(KEYS) do
  gens[i] = tonumber(redis.call('HGET', key, 'gen') or '0') or 0
end
return gens
