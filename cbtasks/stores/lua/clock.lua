-- Loaded by every script that reads the time: the time in ms, from the caller when it
-- passes one (tests' fake clocks), else Redis's own clock, the one clock
-- every host agrees on.
local function now_ms(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
