--! script after: constants clock
-- Hand out parked requests to re-publish, oldest first, each to exactly one
-- caller, at the pace the breaker allows:
--  * open, before its probe window: none;
--  * may probe (open period over, or half-open): one per probe interval, so
--    that parked traffic itself can probe the endpoint (with every request
--    parked, nothing else would, and nothing would close the circuit);
--  * closed: slow start. The rate starts at the base rate when the circuit
--    closes and doubles every second while it stays closed, up to the cap; a
--    failure recorded meanwhile halves it (the breaker's 'ft' counts them), a
--    trip stops it, and the next close starts again from the base rate.
-- A handed-out request sits in KEYS[3] under a lease until ack.lua removes
-- it; a lease that runs out (the releaser died) puts it back in front.
-- Nothing is written when there is nothing to hand out.
-- KEYS[1] parked zset, KEYS[2] data hash, KEYS[3] releasing zset,
-- KEYS[4] the breaker's state hash, KEYS[5] the ramp hash, KEYS[6] expiries
-- (zset: id -> when the request expires, ms). Expired requests leave the lot
-- whatever the circuit's state, to be revoked by the caller.
-- ARGV[1] base rate per second, ARGV[2] the cap (0: none), ARGV[3] lease ms,
-- ARGV[4] now in ms or '', ARGV[5] ms between probe releases, ARGV[6] most
-- to hand out at once.
-- Returns {wait_ms, n_expired, id1, json1, id2, json2, ...}: the first
-- n_expired pairs expired, the rest are to re-publish. wait_ms is 0 when it
-- handed some out, -1 when only news can change the answer (nothing parked,
-- forced open), else the ms until it may hand out more (or one expires).
local now = now_ms(ARGV[4])
local base, cap, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local probe_every, most = tonumber(ARGV[5]), tonumber(ARGV[6])

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], 0, id)  -- back to the front of the line
end

local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, most)) do
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[1], id)
  expired[#expired + 1] = id
  expired[#expired + 1] = redis.call('HGET', KEYS[2], id) or ''
  redis.call('HDEL', KEYS[2], id)
end
-- Wait no longer than until the next request expires.
local next_expiry = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')[2]
local function waiting(ms)
  if #expired > 0 then ms = 0 end
  if next_expiry then
    local until_expiry = math.max(tonumber(next_expiry) - now, 0)
    if ms < 0 or until_expiry < ms then ms = until_expiry end
  end
  local reply = {ms, #expired / 2}
  for _, v in ipairs(expired) do reply[#reply + 1] = v end
  return reply
end

local parked = redis.call('ZCARD', KEYS[1])
if parked == 0 then return waiting(-1) end
local b = redis.call('HMGET', KEYS[4], 'st', 'md', 'ou', 'vn', 'ft')
local state, mode = tonumber(b[1]) or 0, tonumber(b[2]) or 0
if mode == FORCED_OPEN then return waiting(-1) end  -- forced open: an operator's close is news
local n
if state ~= CLOSED then
  local open_until = tonumber(b[3]) or 0
  if state == OPEN and now < open_until then return waiting(open_until - now) end
  local last = tonumber(redis.call('HGET', KEYS[5], 'probe_ts')) or 0
  if now - last < probe_every then return waiting(probe_every - (now - last)) end
  redis.call('HSET', KEYS[5], 'probe_ts', now)
  n = 1
else
  local version, failures = tonumber(b[4]) or 0, tonumber(b[5]) or 0
  local r = redis.call('HMGET', KEYS[5], 'vn', 'rate', 'ts', 'tokens', 'ft')
  local rate, tokens, seen
  if tonumber(r[1]) ~= version then
    -- A new closed period: one second's worth at the base rate to start.
    rate, tokens, seen = base, base, failures
  else
    local ts = tonumber(r[3])
    rate, tokens, seen = tonumber(r[2]), tonumber(r[4]), tonumber(r[5])
    local elapsed = math.max(0, now - ts) / 1000
    local grown = rate * 2 ^ elapsed
    if cap > 0 then grown = math.min(grown, cap) end
    -- Tokens accrue at the mean of the rate over the interval.
    tokens = tokens + elapsed * (rate + grown) / 2
    rate = grown
    if failures > seen then
      rate = math.max(base, rate / 2 ^ math.min(failures - seen, 30))
    end
    seen = failures
  end
  if cap > 0 then rate = math.min(rate, cap) end
  tokens = math.min(tokens, math.max(rate, 1))  -- at most one second's worth banked
  n = math.min(math.floor(tokens), parked, most)
  if n < 1 then
    if tonumber(r[1]) ~= version or tonumber(r[5]) ~= seen then
      redis.call('HSET', KEYS[5], 'vn', version, 'rate', rate, 'ts', now, 'tokens', tokens, 'ft', seen)
    end
    return waiting(math.ceil((1 - tokens) * 1000 / rate))
  end
  redis.call('HSET', KEYS[5], 'vn', version, 'rate', rate, 'ts', now,
    'tokens', tokens - n, 'ft', seen)
end

local reply = waiting(0)
local popped = redis.call('ZPOPMIN', KEYS[1], n)
for i = 1, #popped, 2 do
  local id = popped[i]
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('ZREM', KEYS[6], id)
  reply[#reply + 1] = id
  reply[#reply + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return reply
