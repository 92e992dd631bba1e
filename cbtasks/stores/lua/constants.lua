-- Loaded first by every cbtasks script: the numbers the Python side names too
-- (cbtasks/_state.py State and Mode codes, _machine.py MIN_STRAGGLER_WAIT_MS);
-- tests/test_lua_constants.py holds the two sides to the same values.
local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local NORMAL, FORCED_OPEN, DISABLED = 0, 1, 2
-- A request that finds every probe slot taken waits at least this long (ms).
local MIN_STRAGGLER_WAIT_MS = 100
-- Outcomes, as the stores pass them (cbtasks/_state.py Outcome).
local SUCCESS, FAILURE, IGNORED, OVERLOAD = 0, 1, 2, 3
-- Which part of a limit refused a call (cbtasks/_limit.py).
local BY_CONCURRENCY, BY_RATE, BY_TOKENS = 1, 2, 3
-- The limit's arithmetic (cbtasks/_limiter.py names the same numbers).
local MIN_WAIT_MS, UNKNOWN_DURATION_MS = 5, 100
local OVERLOAD_BACKOFF, LATENCY_BACKOFF, GROWTH = 0.8, 0.5, 0.2
local LATENCY_SMOOTHING, SMOOTHING_CALLS = 0.1, 10
local PROBE_INTERVAL_MS, PROBE_CALLS = 30000, 10
-- A breaker's history keeps about this many entries (XADD MAXLEN ~).
local HISTORY_LENGTH = 1000
