-- ARGV[5] the id this call gets if it becomes a probe.
-- Returns {admitted, is_probe, retry_after_ms, <finish>}.
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
return finish(admit())
