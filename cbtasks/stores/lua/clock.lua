-- Loaded by every script that reads the time: the time in ms, from the caller when it
-- passes one (tests' fake clocks), else Redis's own clock, the one clock
-- every host agrees on. now_exact_ms keeps TIME's microseconds (a limit's
-- permits can be closer than a millisecond apart).
local function now_exact_ms(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local function now_ms(given)
  return math.floor(now_exact_ms(given))
end
