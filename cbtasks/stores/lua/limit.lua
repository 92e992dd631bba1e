-- The breaker's limit in Lua, loaded after common.lua by the scripts that
-- admit, record and read a call (admit, record, status). The same arithmetic
-- as cbtasks/_limiter.py; the contract and property tests hold the two to
-- the same answers. Its state: fields of the breaker's hash (LIMIT_FIELDS,
-- read by common.lua into LS) and the slots in KEYS[4].
local SLOTS = KEYS[4]

-- The limit (LimitWire.encoded), or nil for ''.
local function parse_limit(text)
  if text == '' then return nil end
  local p = {string.match(text, '^' .. string.rep('([^:]*):', 10) .. '([^:]*)$')}
  for i = 1, 11 do p[i] = tonumber(p[i]) end
  return {
    text = text, concurrency = p[1], lease_ms = p[2], rate_ms = p[3], burst_ms = p[4],
    token_ms = p[5], token_burst_ms = p[6], adaptive = p[7] == 1, min = p[8], max = p[9],
    start = p[10], tolerance = p[11],
  }
end

local limit_dirty = {}

local function lset(name, value)
  if LS[name] ~= value then LS[name] = value; limit_dirty[name] = true end
end

local function limit_save()
  local changes = {}
  for name in pairs(limit_dirty) do
    changes[#changes + 1] = name
    changes[#changes + 1] = LS[name]
  end
  if #changes > 0 then redis.call('HSET', H, unpack(changes)) end
end

local function limit_capacity(LW)
  if not LW.adaptive then return LW.concurrency end
  local limit = LS.al
  if limit <= 0 then limit = LW.start end
  limit = math.floor(limit)
  -- While the no-load latency is re-measured, half the limit: no queue at the endpoint.
  if LS.pf > 0 then return math.max(LW.min, math.floor(limit / 2)) end
  return limit
end

-- Calls holding a slot; the dead holders' slots (leases run out) are dropped only
-- when the count says full: a slot is expired when it matters, not at every call.
local function in_flight(cap)
  local count = redis.call('ZCARD', SLOTS)
  if count >= cap then
    redis.call('ZREMRANGEBYSCORE', SLOTS, '-inf', now_exact)
    count = redis.call('ZCARD', SLOTS)
  end
  return count
end

-- When a slot is likely free: the oldest call's expected end, else a share of a call.
local function slot_wait(LW, cap)
  local duration = LS.lt
  if duration <= 0 then duration = UNKNOWN_DURATION_MS end
  local first = redis.call('ZRANGE', SLOTS, 0, 0, 'WITHSCORES')
  local oldest_start = tonumber(first[2]) - LW.lease_ms
  local wait = oldest_start + duration - now_exact
  if wait < MIN_WAIT_MS then wait = duration / cap end
  return math.min(math.max(wait, MIN_WAIT_MS), LW.lease_ms)
end

-- Take a slot, a rate permit and `tokens`, all or none. Returns the part that
-- refused (0: none), the ms to wait, and the ms an admitted call sleeps first.
local function limit_acquire(LW, slot, tokens, wait_ms)
  if LS.lw ~= LW.text then lset('lw', LW.text) end
  local cap = limit_capacity(LW)
  if cap > 0 and in_flight(cap) >= cap then
    limit_save()
    return BY_CONCURRENCY, slot_wait(LW, cap), 0
  end
  local delay, rate_tat, token_tat = 0, 0, 0
  if LW.rate_ms > 0 then
    rate_tat = math.max(LS.rt, now_exact)
    local start = rate_tat - LW.burst_ms
    if start - now_exact > wait_ms then
      limit_save()
      return BY_RATE, start - now_exact, 0
    end
    delay = math.max(delay, start - now_exact)
  end
  if LW.token_ms > 0 and tokens > 0 then
    local cost = math.min(tokens, LW.token_burst_ms / LW.token_ms) * LW.token_ms
    token_tat = math.max(LS.kt, now_exact) + cost
    local start = token_tat - LW.token_burst_ms
    if start - now_exact > wait_ms then
      limit_save()
      return BY_TOKENS, start - now_exact, 0
    end
    delay = math.max(delay, start - now_exact)
  end
  if cap > 0 then redis.call('ZADD', SLOTS, now_exact + delay + LW.lease_ms, slot) end
  if LW.rate_ms > 0 then lset('rt', rate_tat + LW.rate_ms) end
  if LW.token_ms > 0 and tokens > 0 then lset('kt', token_tat) end
  -- Calls admitted this second and the last one, for operators.
  local second = math.floor(now_exact / 1000)
  if LS.rs ~= second then
    if LS.rs == second - 1 then lset('r0', LS.r1) else lset('r0', 0) end
    lset('r1', 0); lset('rs', second)
  end
  lset('r1', LS.r1 + 1)
  limit_save()
  return 0, 0, delay
end

local function cut(LW, factor)
  lset('al', math.max(LW.min, LS.al * factor))
  lset('cu', now_exact)
  lset('sc', 0)
end

-- The adaptive rule (see cbtasks/_limiter.py). Returns whether an overload counts.
local function adapt(LW, outcome, latency, flying)
  if LS.al <= 0 then lset('al', LW.start) end
  -- One cut per queue: the calls admitted under the old limit are one signal.
  local cooled = now_exact >= LS.cu + LS.lt
  if outcome == OVERLOAD then
    if LS.al <= LW.min then return true end
    if cooled then cut(LW, OVERLOAD_BACKOFF) end
    return false
  end
  if outcome ~= SUCCESS or latency < 0 then return false end
  lset('sc', LS.sc + 1)
  if LS.pf > 0 then
    if now_exact - latency >= LS.pf then
      lset('pc', LS.pc + 1)
      lset('pu', LS.pu + latency)
      if LS.pc >= PROBE_CALLS then
        lset('nl', LS.pu / LS.pc)
        lset('pf', 0)
        lset('pn', now_exact + PROBE_INTERVAL_MS)
      end
    end
    return false
  end
  if now_exact >= LS.pn then
    lset('pf', now_exact); lset('pc', 0); lset('pu', 0)
    return false
  end
  lset('nl', math.min(LS.nl, LS.lt))
  if LS.lt > LW.tolerance * LS.nl then
    -- The smoothed latency must have seen the calls admitted since the last cut.
    if cooled and LS.sc >= SMOOTHING_CALLS then cut(LW, math.max(LATENCY_BACKOFF, LS.nl / LS.lt)) end
  elseif flying >= math.floor(LS.al) - 1 then
    lset('al', math.min(LW.max, LS.al + GROWTH / LS.al))
  end
  return false
end

-- Give back what a call held and learn from how it went. `used` < 0: the
-- estimate stands; `latency` < 0: not timed. Returns whether an "overloaded"
-- answer counts toward opening the circuit.
local function limit_release(LW, slot, reserved, used, latency, outcome)
  -- Only the adaptive rule asks how full the limit was.
  local flying = 0
  if LW.adaptive then flying = redis.call('ZCARD', SLOTS) end
  if slot ~= '' then redis.call('ZREM', SLOTS, slot) end
  if LW.token_ms > 0 and used >= 0 and reserved > 0 and used ~= reserved then
    local held = math.min(reserved, LW.token_burst_ms / LW.token_ms)
    lset('kt', LS.kt + (used - held) * LW.token_ms)
  end
  if outcome == SUCCESS and latency >= 0 then
    if LS.lt <= 0 then lset('lt', latency)
    else lset('lt', LS.lt + LATENCY_SMOOTHING * (latency - LS.lt)) end
  end
  local counts = outcome == OVERLOAD
  if LW.adaptive then counts = adapt(LW, outcome, latency, flying) end
  limit_save()
  return counts
end
