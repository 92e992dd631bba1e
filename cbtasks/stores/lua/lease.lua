--! script
-- Take or keep a lease in one step: KEYS[1] the lease, ARGV[1] the holder,
-- ARGV[2] its length in ms. Returns 1 if ARGV[1] holds it now (taken, or its
-- own renewed), 0 if another holds it. Reading the holder and extending the
-- lease in two commands would let it expire between them, another take it,
-- and this holder extend the other's lease: two holders.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
