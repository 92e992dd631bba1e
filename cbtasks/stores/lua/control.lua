--! script after: constants clock common
-- ARGV[5] the command: force_open, force_close, force_half_open, reset, disable,
-- enable (an operator's), or healthy (a health check passed: open goes half-open now);
-- ARGV[6] who gave it and ARGV[7] why ('' if unsaid), for the history.
local op = ARGV[5]
if op ~= 'healthy' then history_command, history_by, history_why = op, ARGV[6], ARGV[7] end
local before = S.st
if op == 'healthy' then
  -- A health check opens the door, only real calls (probes) close it. Never
  -- against an operator's forced open; no change, no news.
  if S.st == OPEN and S.md ~= FORCED_OPEN then half_open('health check passed') end
  return finish({})
end
set('vn', S.vn + 1)
if op == 'force_open' then
  set('md', FORCED_OPEN); set('st', OPEN); set('ou', now)
  redis.call('DEL', PROBES)
  if before ~= OPEN then transitions[#transitions + 1] = {before, OPEN, 'forced open'} end
elseif op == 'disable' and S.md == FORCED_OPEN then
  -- The operator lifts the force for shadow mode: it counts from a closed circuit.
  set('md', DISABLED)
  close('disabled by an operator')
elseif op == 'disable' or op == 'enable' then
  -- Leave a forced open through a half-open probe: the policy decides again.
  if S.md == FORCED_OPEN then set('ou', now) end
  if op == 'disable' then set('md', DISABLED) else set('md', NORMAL) end
elseif op == 'force_close' then
  set('md', NORMAL)
  close('')
  if before ~= CLOSED then transitions[#transitions + 1] = {before, CLOSED, 'forced closed'} end
elseif op == 'force_half_open' then
  -- Probes decide from here, as after an open period: a test's or an operator's.
  set('md', NORMAL); set('st', HALF_OPEN); set('ou', 0)
  redis.call('DEL', PROBES)
  set('ps', 0)
  if before ~= HALF_OPEN then transitions[#transitions + 1] = {before, HALF_OPEN, 'forced half-open'} end
elseif op == 'reset' then
  local version = S.vn
  redis.call('DEL', H, RING, PROBES)
  for _, name in ipairs(FIELDS) do S[name] = 0 end
  S.ws, S.lf = '', ''
  dirty = {}
  set('vn', version)
  if before ~= CLOSED then transitions[#transitions + 1] = {before, CLOSED, 'reset'} end
else
  return redis.error_reply('unknown breaker command ' .. op)
end
return finish({})
