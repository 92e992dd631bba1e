--! script after: constants clock
-- Park one deferred request. KEYS[1] parked zset (id -> parked at, ms),
-- KEYS[2] parked data hash (id -> message JSON). ARGV[1] id, ARGV[2] JSON,
-- ARGV[3] now in ms or '' for Redis TIME, ARGV[4] the channel that wakes
-- sleeping releasers, ARGV[5] the breaker's name, ARGV[6] when the request
-- expires (ms) or ''; KEYS[3] the expiries zset. Returns the number parked.
local now = now_ms(ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- NX: a request parked again keeps its place in line (oldest first).
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], tonumber(ARGV[6]), ARGV[1]) end
local parked = redis.call('ZCARD', KEYS[1])
-- Releasers sleep while the lot is empty: the first request wakes them.
if parked == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return parked
