-- Park one deferred request. KEYS[1] parked zset (id -> parked at, ms),
-- KEYS[2] parked data hash (id -> message JSON). ARGV[1] id, ARGV[2] JSON,
-- ARGV[3] now in ms or '' for Redis TIME. Returns the number parked.
local now = now_ms(ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- NX: a request parked again keeps its place in line (oldest first).
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
return redis.call('ZCARD', KEYS[1])
