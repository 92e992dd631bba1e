"""The breaker's states, the outcomes it records, and its state-change event."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Outcome", "State", "StateChange"]


class State(enum.StrEnum):
    """Where a circuit is: calls flow (closed), are refused (open), or probe (half-open)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: States by the small integer the stores keep.
STATE_BY_CODE = (State.CLOSED, State.OPEN, State.HALF_OPEN)
CODE_BY_STATE = {state: code for code, state in enumerate(STATE_BY_CODE)}


class Outcome(enum.IntEnum):
    """What a guarded call did, as the breaker counts it."""

    SUCCESS = 0
    FAILURE = 1
    #: The caller's own error (bad input, 4xx): counted as neither.
    IGNORED = 2
    #: The endpoint is busy, not failing (TGI's 429 "Model is overloaded", a full
    #: queue's 503, RESOURCE_EXHAUSTED): it shrinks an adaptive limit, and counts
    #: as a failure only without one, or once the limit is at its minimum.
    OVERLOAD = 3


class Mode(enum.IntEnum):
    """An operator's override, shared by every process using the breaker."""

    NORMAL = 0
    #: Open until closed or reset by an operator.
    FORCED_OPEN = 1
    #: Shadow mode: every call is admitted, outcomes are still counted.
    DISABLED = 2


@dataclass(frozen=True, slots=True)
class StateChange:
    """The breaker ``breaker`` went from ``from_state`` to ``to_state`` at ``at``.

    ``at`` is in seconds since the epoch, on the store's clock (Redis's own
    clock for a RedisStore). ``reason`` says why, for people.
    """

    breaker: str
    from_state: State
    to_state: State
    reason: str
    at: float
