-- Read-only. Returns {exists, <finish>, trips, consecutive, calls, failures, slow,
-- probes in use, open_until ms}.
redis.call('ZREMRANGEBYSCORE', PROBES, '-inf', now)
local exists = redis.call('EXISTS', H)
dirty = {}
local reply = finish({exists})
for _, v in ipairs({S.tr, S.cf, S.nc, S.nf, S.ns, redis.call('ZCARD', PROBES), S.ou}) do
  reply[#reply + 1] = v
end
return reply
