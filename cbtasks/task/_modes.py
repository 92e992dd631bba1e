"""The deferral modes: how a request the task cannot run now waits for its circuit.

Each mode is one small object, asked by the task (how to defer the request
in hand), by the worker's start (does it park: run a releaser; does it
pause: gate the queue), by the limit (how long a refused request waits in
its process) and by Flower's events (what to call it). A new mode is one
class here and one entry in :data:`MODES`; the option's check reads the
names from there, so nothing else dispatches on a mode's string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._errors import CallRefused, PolicyError

#: A request the limit refuses waits up to this long in its process by default
#: (a rate's permit is reserved and slept for; a slot is asked for again when
#: one is likely free): re-publishing it to wait 20 ms costs the broker a round
#: trip and the permit its moment. Past it the request is deferred by countdown.
LIMIT_WAIT = 1.0
#: With defer="pause", this long: the worker takes no more of the queue
#: meanwhile, so the fleet consumes it at the limit's pace.
PAUSE_LIMIT_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the circuit or the limit refused, and the headers it will wait with."""

    error: CallRefused
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    #: Deferrals before this one.
    deferrals: int


class DeferralMode:
    """How a request waits. The task does the mechanics (``_defer_by_countdown``,
    ``_defer_by_parking``); a mode decides which, and says what it is."""

    name: ClassVar[str]
    #: Its requests wait parked in Redis: the worker's main process runs a releaser.
    parks: ClassVar[bool] = False
    #: The fleet stops consuming the task's queue while the circuit is open.
    pauses_queue: ClassVar[bool] = False
    #: Seconds a request the limit refuses waits in its process by default.
    limit_wait: ClassVar[float] = LIMIT_WAIT
    #: What Flower's event calls a request deferred this way.
    action: ClassVar[str] = "deferred"

    def in_hand(self, task: Any) -> DeferralMode:
        """The mode that defers a request already taken from the queue."""
        return self

    def defer(self, task: Any, refusal: Refusal) -> str:
        """Defer the request; the name of the mode that took it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<deferral mode {self.name}>"


class Countdown(DeferralMode):
    """Re-published with the same task id and a countdown: back when the circuit may be."""

    name = "countdown"

    def defer(self, task: Any, refusal: Refusal) -> str:
        task._defer_by_countdown(refusal)
        return self.name


class Park(DeferralMode):
    """Parked in Redis until the circuit closes, then released at a slow-starting rate;
    by countdown where Redis cannot take it (or state is in the process: memory://)."""

    name = "park"
    parks = True
    action = "parked"

    def defer(self, task: Any, refusal: Refusal) -> str:
        if task._defer_by_parking(refusal):
            return self.name
        return COUNTDOWN.defer(task, refusal)


class Pause(DeferralMode):
    """The fleet stops taking the queue while the circuit is open (``_pause``); a request
    already in hand waits as ``pause_in_hand`` says (countdown or park)."""

    name = "pause"
    pauses_queue = True
    limit_wait = PAUSE_LIMIT_WAIT

    def in_hand(self, task: Any) -> DeferralMode:
        return IN_HAND_MODES[task.pause_in_hand]

    def defer(self, task: Any, refusal: Refusal) -> str:
        return self.in_hand(task).defer(task, refusal)


COUNTDOWN = Countdown()
#: Every mode by its name: ``defer=`` takes these.
MODES: dict[str, DeferralMode] = {mode.name: mode for mode in (COUNTDOWN, Park(), Pause())}
#: The modes a request in hand can wait by (``pause_in_hand=`` takes these).
IN_HAND_MODES: dict[str, DeferralMode] = {
    name: mode for name, mode in MODES.items() if not mode.pauses_queue
}


def mode_named(name: str) -> DeferralMode:
    """The mode called ``name``; PolicyError naming the modes for any other name (the
    task's options are checked at registration: this is the last line)."""
    try:
        return MODES[name]
    except KeyError:
        raise PolicyError(f"defer must be one of {', '.join(MODES)}, got {name!r}") from None
