-- Hand out parked requests to re-publish, oldest first, each to exactly one
-- caller: at most `rate` per second (a token bucket) while the circuit is
-- closed, one per probe interval while it may probe, none while it is open. A handed-out request sits in KEYS[3] under a lease until
-- ack.lua removes it; a lease that runs out (the releaser died) puts it back.
-- KEYS[1] parked zset, KEYS[2] data hash, KEYS[3] releasing zset,
-- KEYS[4] the breaker's state hash, KEYS[5] the bucket hash.
-- ARGV[1] rate per second, ARGV[2] burst, ARGV[3] lease ms, ARGV[4] now or '',
-- ARGV[5] ms between requests released to probe.
-- Returns {id1, json1, id2, json2, ...}.
local now = now_ms(ARGV[4])
local rate, burst, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], 0, id)  -- back to the front of the line
end

local breaker = redis.call('HMGET', KEYS[4], 'st', 'md', 'ou')
local state, mode = tonumber(breaker[1]) or 0, tonumber(breaker[2]) or 0
if mode == 1 then return {} end  -- forced open: wait for an operator
local n
if state ~= 0 then
  -- Open: nothing until the probe window. Then one request at a time, every
  -- probe_interval ms, so that parked traffic itself can probe the endpoint
  -- (with every request parked, nothing else would, and nothing would close it).
  if state == 1 and now < (tonumber(breaker[3]) or 0) then return {} end
  local last = tonumber(redis.call('HGET', KEYS[5], 'probe_ts')) or 0
  if now - last < tonumber(ARGV[5]) then return {} end
  redis.call('HSET', KEYS[5], 'probe_ts', now)
  n = math.min(1, redis.call('ZCARD', KEYS[1]))
else
  local bucket = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  local tokens, ts = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  n = math.min(math.floor(tokens), redis.call('ZCARD', KEYS[1]))
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - math.max(n, 0)), 'ts', now)
end
if n <= 0 then return {} end

local reply = {}
local popped = redis.call('ZPOPMIN', KEYS[1], n)
for i = 1, #popped, 2 do
  local id = popped[i]
  redis.call('ZADD', KEYS[3], now + lease, id)
  reply[#reply + 1] = id
  reply[#reply + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return reply
