--! script after: constants clock
-- The healthy path, on its own: a plain call (no probe) succeeded, quickly,
-- under a policy with no rate window. This is record.lua for that one case,
-- without loading the whole machine: in a closed circuit it clears the
-- consecutive-failure count; in any other state it changes nothing (a late
-- outcome). KEYS[1] the breaker's hash; ARGV[1] the policy's open_ms,
-- ARGV[2] now in ms or '' for Redis TIME.
-- Returns version * 4 + mode while closed, else
-- {state, ms until it may change, mode, version, now (0: not read)}.
local H = KEYS[1]
local raw = redis.call('HMGET', H, 'st', 'cf', 'md', 'vn')
local state, mode, version = tonumber(raw[1]) or 0, tonumber(raw[3]) or 0, tonumber(raw[4])
if not version then
  version = 0
  redis.call('HSET', H, 'vn', 0)  -- first use: operators can list it
end
if state == CLOSED then
  if (tonumber(raw[2]) or 0) ~= 0 then redis.call('HSET', H, 'cf', 0) end
  return version * 4 + mode  -- one integer: the cheapest reply to send and parse
end
if state == HALF_OPEN then return {HALF_OPEN, 0, mode, version, 0} end
local open_ms = tonumber(ARGV[1])
if mode == FORCED_OPEN then return {OPEN, open_ms, mode, version, 0} end
local now = now_ms(ARGV[2])
local open_until = tonumber(redis.call('HGET', H, 'ou')) or 0
if now < open_until then return {OPEN, open_until - now, mode, version, now} end
return {HALF_OPEN, 0, mode, version, now}
