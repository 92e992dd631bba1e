--! script after: constants
-- Released requests were re-published: forget them, unless one was parked
-- again meanwhile (its new message must stay). KEYS[1] releasing zset,
-- KEYS[2] data hash, KEYS[3] parked zset. ARGV the ids.
for _, id in ipairs(ARGV) do
  redis.call('ZREM', KEYS[1], id)
  if not redis.call('ZSCORE', KEYS[3], id) then redis.call('HDEL', KEYS[2], id) end
end
return #ARGV
