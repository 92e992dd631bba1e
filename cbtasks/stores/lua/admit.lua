--! script after: constants clock common limit
-- ARGV[5] the id this call gets if it becomes a probe; ARGV[6] the limit
-- (LimitWire.encoded, '' for none), ARGV[7] the id of the slot it takes,
-- ARGV[8] the tokens it reserves, ARGV[9] ms it may wait for a rate or token permit.
-- Returns {admitted, is_probe, retry_after_ms, refused_by, delay_ms, <finish>}:
-- refused_by names the part of the limit that refused (0: none, or the circuit),
-- delay_ms how long an admitted call sleeps before it starts (a permit reserved ahead).
local function admit()
  if S.md == FORCED_OPEN then return {0, 0, W.open_ms} end
  local disabled = 0
  if S.md == DISABLED then disabled = 1 end
  if S.st == OPEN then
    if now < S.ou then return {disabled, 0, S.ou - now} end
    half_open('open period elapsed')
  end
  if S.st == HALF_OPEN then
    redis.call('ZREMRANGEBYSCORE', PROBES, '-inf', now)
    if redis.call('ZCARD', PROBES) < W.half_open_probes then
      redis.call('ZADD', PROBES, now + W.lease_ms, ARGV[5])
      return {1, 1, 0}
    end
    -- Every slot taken: come back in about one probe's duration (as long as
    -- the oldest probe has run so far, at least MIN_STRAGGLER_WAIT_MS), not a
    -- whole period.
    local first = redis.call('ZRANGE', PROBES, 0, 0, 'WITHSCORES')
    local lease_end = tonumber(first[2])
    local running = now - (lease_end - W.lease_ms)
    return {disabled, 0, math.min(math.max(running, MIN_STRAGGLER_WAIT_MS), lease_end - now, W.open_ms)}
  end
  return {1, 0, 0}
end

local head = admit()
head[4], head[5] = 0, 0
local LW = parse_limit(ARGV[6])
-- Shadow mode admits every call: the limit, like the circuit, only watches.
if head[1] == 1 and LW and S.md ~= DISABLED then
  local by, wait, delay = limit_acquire(LW, ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]))
  if by > 0 then
    -- Refused by the limit: a probe slot taken above goes back.
    if head[2] == 1 then redis.call('ZREM', PROBES, ARGV[5]) end
    head = {0, 0, math.ceil(wait), by, 0}
  else
    head[5] = math.ceil(delay)
  end
end
return finish(head)
