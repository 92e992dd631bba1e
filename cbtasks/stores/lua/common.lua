-- The breaker's state machine in Lua, loaded by the machine's scripts (admit,
-- record, control, status). It makes the transitions cbtasks/_machine.py
-- makes; the contract and property tests hold the two to identical
-- behaviour. (record.lua also counts failures in 'ft' for the parking lot's
-- slow start, which the Python machine has no use for.)
--
-- KEYS[1] hash of the breaker's fields, KEYS[2] its count-window ring
-- (one byte per call), KEYS[3] its probes (zset: probe id -> lease end, ms),
-- KEYS[4] its limit's slots (zset: slot id -> lease end, ms; see limit.lua),
-- KEYS[5] its history (a stream capped near HISTORY_LENGTH: every transition and
-- operator's command, at Redis time).
-- ARGV[1] channel for state news, ARGV[2] breaker name, ARGV[3] policy
-- (PolicyWire.encoded), ARGV[4] now in ms or '' for Redis TIME.

-- (lf: the last failure counted, "Type: message", for operators; a string, as ws is.
-- ta: every trip since the breaker was made or reset; tr counts those in a row.)
local FIELDS = {'st', 'md', 'ou', 'tr', 'cf', 'nc', 'nf', 'ns', 'ws', 'rp', 'le', 'ps', 'vn', 'lf', 'ta'}
local H, RING, PROBES = KEYS[1], KEYS[2], KEYS[3]

-- One string.match: a gmatch loop costs Redis several times as much.
local P = {string.match(ARGV[3], '^' .. string.rep('([^:]*):', 14) .. '([^:]*)$')}
for i = 1, 15 do P[i] = tonumber(P[i]) end
local W = {
  failure_threshold = P[1], window_kind = P[2], window_size = P[3], bucket_ms = P[4],
  min_calls = P[5], failure_rate = P[6], slow_rate = P[7], open_ms = P[8],
  backoff_factor = P[9], max_open_ms = P[10], jitter = P[11], half_open_probes = P[12],
  half_open_successes = P[13], lease_ms = P[14], honor_retry_after = P[15],
}
local window_signature = P[2] .. ':' .. P[3] .. ':' .. P[4]

local now_exact = now_exact_ms(ARGV[4])
local now = math.floor(now_exact)

-- The limit's fields (limit.lua), read in the same HMGET: one command, not two.
local LIMIT_FIELDS = {'lw', 'rt', 'kt', 'al', 'lt', 'nl', 'cu', 'sc', 'pf', 'pc', 'pu', 'pn',
  'r0', 'r1', 'rs'}
local ALL_FIELDS = {unpack(FIELDS)}  -- (f(unpack(a), unpack(b)) would cut a to one value)
for _, name in ipairs(LIMIT_FIELDS) do ALL_FIELDS[#ALL_FIELDS + 1] = name end
local raw = redis.call('HMGET', H, unpack(ALL_FIELDS))
local S, dirty, LS = {}, {}, {}
for i, name in ipairs(FIELDS) do
  if name == 'ws' or name == 'lf' then S[name] = raw[i] or '' else S[name] = tonumber(raw[i]) or 0 end
end
for i, name in ipairs(LIMIT_FIELDS) do
  local value = raw[#FIELDS + i]
  if name == 'lw' then LS[name] = value or '' else LS[name] = tonumber(value) or 0 end
end
local original_version = S.vn
-- A breaker's first use writes its version, so operators can list it.
if not raw[13] then dirty.vn = true end
local transitions = {}
-- The random number that stretches an open period (record.lua sets it).
local rand = 0

local function set(name, value)
  if S[name] ~= value then S[name] = value; dirty[name] = true end
end

local function clear_window()
  set('nc', 0); set('nf', 0); set('ns', 0); set('rp', 0); set('le', 0)
  redis.call('DEL', RING)
  -- Every time-window bucket, whatever window the policy sent here has: an
  -- operator's command (the CLI) may carry another policy than the workers'.
  local buckets = {}
  for _, field in ipairs(redis.call('HKEYS', H)) do
    if string.match(field, '^b%d+[cfs]$') then buckets[#buckets + 1] = field end
  end
  if #buckets > 0 then redis.call('HDEL', H, unpack(buckets)) end
end

local function open_duration_ms(trips)
  local exponent = math.min(math.max(trips - 1, 0), 64)
  local base = math.min(W.open_ms * W.backoff_factor ^ exponent, W.max_open_ms)
  return math.floor(base * (1.0 + W.jitter * rand))
end

local function trip(reason, retry_after_ms)
  local before = S.st
  set('tr', S.tr + 1)
  set('ta', S.ta + 1)
  set('st', OPEN)
  set('ou', now + math.max(open_duration_ms(S.tr), retry_after_ms))
  redis.call('DEL', PROBES)
  set('ps', 0); set('cf', 0)
  clear_window()
  set('vn', S.vn + 1)
  transitions[#transitions + 1] = {before, OPEN, reason}
end

local function close(reason)
  local before = S.st
  set('st', CLOSED); set('tr', 0); set('ou', 0)
  redis.call('DEL', PROBES)
  set('ps', 0); set('cf', 0)
  clear_window()
  set('vn', S.vn + 1)
  if reason ~= '' then transitions[#transitions + 1] = {before, CLOSED, reason} end
end

local function half_open(reason)
  set('st', HALF_OPEN)
  redis.call('DEL', PROBES)
  set('ps', 0)
  set('vn', S.vn + 1)
  transitions[#transitions + 1] = {OPEN, HALF_OPEN, reason}
end

local function add_to_window(failed, slow)
  if S.ws ~= window_signature then
    clear_window()
    set('ws', window_signature)
  end
  local f, s = 0, 0
  if failed then f = 1 end
  if slow then s = 1 end
  if W.window_kind == 1 then
    local old = string.byte(redis.call('GETRANGE', RING, S.rp, S.rp)) or 0
    if old > 0 then
      set('nc', S.nc - 1)
      set('nf', S.nf - math.floor(old / 2) % 2)
      set('ns', S.ns - math.floor(old / 4) % 2)
    end
    redis.call('SETRANGE', RING, S.rp, string.char(1 + 2 * f + 4 * s))
    set('rp', (S.rp + 1) % W.window_size)
  else
    local epoch = math.max(math.floor(now / W.bucket_ms), S.le)
    for passed = math.max(S.le + 1, epoch - W.window_size + 1), epoch do
      local b = 'b' .. (passed % W.window_size)
      local old = redis.call('HMGET', H, b .. 'c', b .. 'f', b .. 's')
      set('nc', S.nc - (tonumber(old[1]) or 0))
      set('nf', S.nf - (tonumber(old[2]) or 0))
      set('ns', S.ns - (tonumber(old[3]) or 0))
      redis.call('HDEL', H, b .. 'c', b .. 'f', b .. 's')
    end
    set('le', epoch)
    local b = 'b' .. (epoch % W.window_size)
    redis.call('HINCRBY', H, b .. 'c', 1)
    if f == 1 then redis.call('HINCRBY', H, b .. 'f', 1) end
    if s == 1 then redis.call('HINCRBY', H, b .. 's', 1) end
  end
  set('nc', S.nc + 1); set('nf', S.nf + f); set('ns', S.ns + s)
end

local function observe()
  if S.st == OPEN then
    if S.md == FORCED_OPEN then return OPEN, W.open_ms end
    if now < S.ou then return OPEN, S.ou - now end
    return HALF_OPEN, 0
  end
  return S.st, 0
end

-- Writes what changed, tells other processes of a new state, and returns
-- {state, ms until it may change, mode, version, now, from, to, reason, ...}
-- after `head` (the op's own leading values).
local STATE_NAMES = {[CLOSED] = 'closed', [OPEN] = 'open', [HALF_OPEN] = 'half_open'}
-- An operator's command to note in the history (control.lua sets them).
local history_command, history_by, history_why = nil, '', ''

-- Every transition (the last failure with a trip), and the operator's command, to
-- the breaker's history.
local function note_history()
  local entries = {}
  for _, t in ipairs(transitions) do
    local entry = {'from', STATE_NAMES[t[1]], 'to', STATE_NAMES[t[2]], 'reason', t[3]}
    if t[2] == OPEN and S.lf ~= '' then
      entry[#entry + 1] = 'failure'; entry[#entry + 1] = S.lf
    end
    entries[#entries + 1] = entry
  end
  if history_command then
    if #entries == 0 then entries[1] = {'state', STATE_NAMES[S.st]} end
    for _, entry in ipairs(entries) do
      entry[#entry + 1] = 'command'; entry[#entry + 1] = history_command
      if history_by ~= '' then entry[#entry + 1] = 'by'; entry[#entry + 1] = history_by end
      if history_why ~= '' then entry[#entry + 1] = 'why'; entry[#entry + 1] = history_why end
    end
  end
  -- Redis's own time names each entry; a test's fake clock names it itself.
  local id = '*'
  if ARGV[4] ~= '' then id = now .. '-*' end
  for _, entry in ipairs(entries) do
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', HISTORY_LENGTH, id, unpack(entry))
  end
end

local function finish(head)
  note_history()
  local changes = {}
  for name in pairs(dirty) do
    changes[#changes + 1] = name
    changes[#changes + 1] = S[name]
  end
  if #changes > 0 then redis.call('HSET', H, unpack(changes)) end
  local state, remaining = observe()
  if S.vn ~= original_version then
    redis.call('PUBLISH', ARGV[1], table.concat(
      {ARGV[2], S.vn, state, remaining, S.md}, '\n'))
  end
  local reply = head
  for _, v in ipairs({state, remaining, S.md, S.vn, now}) do reply[#reply + 1] = v end
  for _, t in ipairs(transitions) do
    reply[#reply + 1] = t[1]; reply[#reply + 1] = t[2]; reply[#reply + 1] = t[3]
  end
  return reply
end
