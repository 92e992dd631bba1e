-- Loaded first by every cbtasks script: the numbers the Python side names too
-- (cbtasks/_state.py State and Mode codes, _machine.py MIN_STRAGGLER_WAIT_MS);
-- tests/test_lua_constants.py holds the two sides to the same values.
local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local NORMAL, FORCED_OPEN, DISABLED = 0, 1, 2
-- A request that finds every probe slot taken waits at least this long (ms).
local MIN_STRAGGLER_WAIT_MS = 100
