--! script after: constants clock common limit
-- ARGV[5] probe id or '', ARGV[6] outcome (SUCCESS, FAILURE, IGNORED, OVERLOAD),
-- ARGV[7] slow (0/1), ARGV[8] retry-after ms, ARGV[9] a random number in [0, 1);
-- ARGV[10] the limit (LimitWire.encoded, '' for none), ARGV[11] the call's slot
-- id or '', ARGV[12] tokens reserved, ARGV[13] tokens used (-1: unknown),
-- ARGV[14] the call's duration in ms (-1: not timed), ARGV[15] what the failure was
-- ("Type: message", '' if none): kept as the last failure for operators.
local function record(outcome)
  local probe_id = ARGV[5]
  local slow, retry_after_ms = ARGV[7] == '1', tonumber(ARGV[8])
  rand = tonumber(ARGV[9])
  if probe_id ~= '' then
    -- Ignored when the probe's lease ran out or other probes decided first.
    if S.st ~= HALF_OPEN then return end
    local lease_end = tonumber(redis.call('ZSCORE', PROBES, probe_id))
    if not lease_end then return end
    redis.call('ZREM', PROBES, probe_id)
    if lease_end <= now then return end
    if outcome == IGNORED then return end
    if outcome == FAILURE and ARGV[15] ~= '' then set('lf', ARGV[15]) end
    if outcome == FAILURE or slow then
      local reason = 'probe was slow'
      if outcome == FAILURE then reason = 'probe failed' end
      return trip(reason, retry_after_ms)
    end
    set('ps', S.ps + 1)
    if S.ps >= W.half_open_successes then
      return close(S.ps .. ' probe(s) succeeded')
    end
    return
  end
  if S.st ~= CLOSED or outcome == IGNORED then return end
  local failed = outcome == FAILURE
  if failed then
    set('cf', S.cf + 1)
    if ARGV[15] ~= '' then set('lf', ARGV[15]) end
    -- Every failure in a closed circuit, ever: the parking lot's release
    -- ramp halves on each (release.lua). Not part of the machine's state.
    redis.call('HINCRBY', H, 'ft', 1)
    if W.honor_retry_after == 1 and retry_after_ms > 0 then
      return trip(string.format('endpoint asked to retry after %d ms', retry_after_ms), retry_after_ms)
    end
  elseif S.cf ~= 0 then
    set('cf', 0)
  end
  if S.cf >= W.failure_threshold then
    return trip(S.cf .. ' consecutive failures', retry_after_ms)
  end
  if W.window_kind ~= 0 then
    add_to_window(failed, slow)
    if S.nc >= W.min_calls then
      if W.failure_rate >= 0 and S.nf / S.nc >= W.failure_rate then
        return trip(string.format('failure rate %d%% over %d calls',
          math.floor(S.nf * 100 / S.nc), S.nc), retry_after_ms)
      end
      if W.slow_rate >= 0 and S.ns / S.nc >= W.slow_rate then
        return trip(string.format('slow-call rate %d%% over %d calls',
          math.floor(S.ns * 100 / S.nc), S.nc), retry_after_ms)
      end
    end
  end
end
-- "Overloaded" is the endpoint busy, not failing: with an adaptive limit it
-- shrinks the limit and counts toward opening only at the limit's minimum.
local outcome = tonumber(ARGV[6])
local LW = parse_limit(ARGV[10])
local counts = outcome == OVERLOAD
if LW then
  counts = limit_release(LW, ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]),
    tonumber(ARGV[14]), outcome)
end
if outcome == OVERLOAD then
  if counts then outcome = FAILURE else outcome = IGNORED end
end
record(outcome)
return finish({})
