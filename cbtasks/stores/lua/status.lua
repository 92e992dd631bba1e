--! script after: constants clock common limit
-- Read-only. Returns {exists, <finish>, trips, consecutive, calls, failures, slow,
-- probes in use, open_until ms, last failure, trips in all, limit, in flight, adaptive limit, admitted last
-- second, tokens available}: the limit as the workers last sent it ('' if none;
-- LimitWire.encoded), the concurrency limit as a string (an adaptive one is a float).
redis.call('ZREMRANGEBYSCORE', PROBES, '-inf', now)
local exists = redis.call('EXISTS', H)
dirty = {}
local reply = finish({exists})
for _, v in ipairs({S.tr, S.cf, S.nc, S.nf, S.ns, redis.call('ZCARD', PROBES), S.ou, S.lf, S.ta}) do
  reply[#reply + 1] = v
end
local LW = parse_limit(LS.lw)
local flying = redis.call('ZCOUNT', SLOTS, '(' .. now_exact, '+inf')
local second = math.floor(now_exact / 1000)
local last_second = 0
if LS.rs == second then last_second = LS.r0 elseif LS.rs == second - 1 then last_second = LS.r1 end
local tokens = 0
if LW and LW.token_ms > 0 then
  tokens = math.floor((LW.token_burst_ms - math.max(0, LS.kt - now_exact)) / LW.token_ms + 1e-3)
end
-- The concurrency limit now: the static one, or where the adaptive one stands.
local concurrency = 0
if LW and LW.adaptive then
  concurrency = LS.al
  if concurrency <= 0 then concurrency = LW.start end
elseif LW then
  concurrency = LW.concurrency
end
for _, v in ipairs({LS.lw, flying, tostring(concurrency), last_second, tokens}) do
  reply[#reply + 1] = v
end
return reply
