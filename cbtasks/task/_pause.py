"""defer="pause": while a breaker's circuit is open, the fleet stops taking its queue.

A request handled while the endpoint is down is work spent on nothing; the
cheapest deferral is not taking the message at all. The queue a pause-mode
task is routed to belongs to its breaker (checked when the worker starts). A
consumer bootstep, :class:`PauseQueues`, runs one :class:`QueueGate` per such
queue in each worker's main process; the gate keeps the worker's consumption
of the queue in line with the circuit, level-triggered: news of the breaker
wakes it, and it looks again every ``RECHECK_SECONDS`` in case news was lost.

- open (or forced open): the worker stops consuming the queue
  (``cancel_task_queue``); the messages wait in the broker, costing nothing;
- half-open: the probes must come from real requests, so one worker of the
  fleet, the one holding a lease in Redis, consumes, with its prefetch cut
  to the probe budget (``half_open_probes``) meanwhile, so it does not take
  requests that would only meet "probes in progress";
- closed (or disabled, or Redis unreachable: the breaker decides per task
  then): every worker consumes again, each after a random delay of up to
  ``RESUME_JITTER_SECONDS``, so the endpoint is not met by the whole fleet at
  once.

Consumer calls go through the event loop (``consumer.call_soon``), never from
the gate's thread. A message already in hand when the circuit opens (one a
process prefetched, or one an in-flight BRPOP delivered) is deferred by
countdown or parked (``pause_in_hand``), so nothing is lost. With the Redis
broker, kombu restores a dead worker's unacknowledged messages only from a
channel that consumes something: a worker whose every queue is paused
consumes ``cbtasks.restore`` (a queue nothing is sent to) meanwhile.

Each paused worker notes itself in ``<prefix>:{breaker}:paused`` (a sorted set
of hostnames by the time the note runs out), which ``cbtasks status`` and the
``cbtasks_queue_paused`` gauge count, and the messages waiting in the queue in
``<prefix>:{breaker}:backlog`` (the ``cbtasks_queue_backlog`` gauge: a paused
queue whose backlog grows is worth an alert).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from .._state import Mode, State
from ..stores._connection import REDIS_TROUBLE
from ..stores._keys import breaker_keys
from ..stores._redis import drive
from ..stores._scripts import SCRIPTS

log = logging.getLogger("cbtasks.task")

#: At most this long between two looks at the circuit, news or not.
RECHECK_SECONDS = 2.0
#: A worker resuming after a close waits a random delay of up to this long.
RESUME_JITTER_SECONDS = 1.0
#: How long the half-open consumer's lease lasts (renewed at every look).
PROBE_LEASE_SECONDS = 3 * RECHECK_SECONDS
#: How long a worker's "paused" note lasts unless renewed (a dead worker's runs out).
PAUSED_NOTE_SECONDS = 3 * RECHECK_SECONDS
#: The queue a worker whose every queue is paused consumes (nothing is sent to it).
RESTORE_QUEUE = "cbtasks.restore"


#: What a worker does with a paused queue: take it, take only the probes, or leave it.
CONSUME, PROBE, PAUSE = "consume", "probe", "pause"


class QueueGate:
    """One worker's consumption of one queue, kept in line with its breaker's circuit.

    ``consume(mode)`` is called on this gate's thread with what the worker
    should do (CONSUME, PROBE or PAUSE); it hands the change to the
    consumer's event loop.
    """

    def __init__(
        self,
        queue: str,
        breaker: Any,
        consume: Callable[[str], None],
        hostname: str,
        *,
        rand: Callable[[], float] = random.random,
        backlog: Callable[[], int | None] | None = None,
    ) -> None:
        self.queue = queue
        self.breaker = breaker
        self.store = breaker.store
        self.hostname = hostname
        self._consume = consume
        self._rand = rand
        #: Messages waiting in the queue (the broker's count), read while paused.
        self._backlog = backlog
        keys = breaker_keys(self.store.prefix, breaker.name)
        self._paused_key = keys.paused
        self._backlog_key = keys.backlog
        self._lease_key = keys.claim(f"consume:{queue}")
        self._wire = breaker.policy.wire()
        #: What this worker does now: it consumes every queue when it starts.
        self.mode = CONSUME
        #: The probe budget: the prefetch while this worker is the half-open consumer.
        self.probes = breaker.policy.half_open_probes
        #: How much this gate cut its consumer's prefetch (undone on resume and at stop).
        self.prefetch = PrefetchCut()
        self.wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"QueueGate({self.queue!r}, breaker={self.breaker.name!r})"

    # -- deciding ------------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        """Whether the worker takes the queue now (all of it, or the probes)."""
        return self.mode != PAUSE

    def wanted(self) -> str:
        """What the circuit says this worker should do with the queue now."""
        try:
            status = self.store.status(self.breaker.name, self._wire, strict=False)
        except REDIS_TROUBLE:
            status = None
        if status is None or status.mode is Mode.DISABLED:
            return CONSUME  # no state yet, shadow mode, or Redis away: the breaker decides
        if status.state is State.CLOSED:
            return CONSUME
        if status.state is State.HALF_OPEN and status.mode is not Mode.FORCED_OPEN:
            return PROBE if self._hold_probe_lease() else PAUSE
        return PAUSE

    def _hold_probe_lease(self) -> bool:
        """True while this worker is the fleet's one half-open consumer of the queue
        (taken, or renewed, in one script: never another worker's lease extended)."""
        ttl = int(PROBE_LEASE_SECONDS * 1000)
        try:
            held = drive(
                self.store.client, SCRIPTS["lease"].run(1, self._lease_key, self.hostname, ttl)
            )
        except REDIS_TROUBLE:
            return True  # Redis away: the breaker decides per task
        return bool(held)

    # -- acting --------------------------------------------------------------------

    def reconcile(self) -> None:
        """Look at the circuit once and make the worker's consumption follow it."""
        wanted = self.wanted()
        if wanted == CONSUME and self.mode == PAUSE:
            # A close reaches every worker at once: spread the fleet's return.
            if self._stopped.wait(self._rand() * RESUME_JITTER_SECONDS):
                return
            wanted = self.wanted()
        if wanted != self.mode:
            self.mode = wanted
            log.info("queue %r of breaker %r: %s", self.queue, self.breaker.name, _SAID[wanted])
            self._consume(wanted)
        self._note()

    def _note(self) -> None:
        """Keep this worker's "paused" note current (or take it away)."""
        client = self.store.client
        try:
            if self.consuming:
                client.zrem(self._paused_key, self.hostname)
            else:
                until = int((time.time() + PAUSED_NOTE_SECONDS) * 1000)
                client.zadd(self._paused_key, {self.hostname: until})
                waiting = self._backlog() if self._backlog is not None else None
                if waiting is not None:  # for operators: a paused queue's backlog
                    ttl = int(PAUSED_NOTE_SECONDS * 1000)
                    client.set(self._backlog_key, waiting, px=ttl)
        except REDIS_TROUBLE as exc:
            log.debug("cannot note the pause of %r (%s)", self.queue, exc)

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        self.store.add_news_hook(self._on_news)
        self._thread = threading.Thread(
            target=self._run, name=f"cbtasks-pause-{self.queue}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.wake.set()
        self.store.remove_news_hook(self._on_news)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with contextlib.suppress(*REDIS_TROUBLE):  # else the note runs out on its own
            self.store.client.zrem(self._paused_key, self.hostname)

    def _on_news(self, name: str) -> None:
        if name == self.breaker.name:
            self.wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.wake.clear()
            try:
                self.reconcile()
            except Exception:
                log.exception("queue %r: the pause check failed", self.queue)
            self.wake.wait(RECHECK_SECONDS)


class PauseQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """The consumer bootstep of defer="pause": a QueueGate per paused queue it consumes."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.gates: list[QueueGate] = []

    def start(self, consumer: Any) -> None:
        consumed = {queue.name for queue in consumer.task_consumer.queues}
        tasks = {}
        for queue, task in pause_queues(consumer.app).items():
            if queue in consumed:
                tasks[queue] = task
        redis_broker = getattr(consumer.connection.transport, "driver_type", "") == "redis"
        for queue, task in tasks.items():
            cut = PrefetchCut()
            gate = QueueGate(
                queue,
                task.cbtasks_breaker,
                _consumer_switch(consumer, queue, task_probes(task), consumed, redis_broker, cut),
                consumer.hostname,
                backlog=functools.partial(queue_backlog, consumer.app, queue),
            )
            gate.prefetch = cut
            # Before the event loop runs: a worker that starts while the circuit
            # is open takes nothing from the queue.
            first = gate.wanted()
            if first != CONSUME:
                gate.mode = first
                _apply(consumer, queue, first, gate.probes, consumed, redis_broker, cut)
                gate._note()
            gate.start()
            self.gates.append(gate)

    def stop(self, consumer: Any) -> None:
        # A consumer that restarts (a broker reconnect) builds a fresh QoS: a cut
        # left on the old one would be added to the new one's at the next resume.
        for gate in self.gates:
            gate.stop()
            gate.prefetch.undo(consumer)
        self.gates = []

    shutdown = stop


_SAID = {
    CONSUME: "consuming again",
    PROBE: "the fleet's half-open consumer (prefetch cut to the probe budget)",
    PAUSE: "paused while the circuit is open",
}


def _consumer_switch(
    consumer: Any,
    queue: str,
    probes: int,
    consumed: set[str],
    redis_broker: bool,
    cut: PrefetchCut,
) -> Callable[[str], None]:
    """What a gate calls: the change, handed to the consumer's event loop."""

    def switch(mode: str) -> None:
        consumer.call_soon(_apply, consumer, queue, mode, probes, consumed, redis_broker, cut)
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is not None:
            consumer.call_soon(
                dispatcher.send, "worker-circuit_queue", queue=queue, paused=mode == PAUSE
            )

    return switch


class PrefetchCut:
    """How much a gate cut its consumer's prefetch while it was the half-open consumer.

    Celery's QoS value also moves with the ETA messages a worker holds, so the
    cut is undone by the amount it took, never by setting a value. It belongs
    to the gate (a module global keyed by the consumer outlived a restarted
    consumer and was added to its fresh QoS).
    """

    __slots__ = ("amount", "qos")

    def __init__(self) -> None:
        self.amount = 0
        #: The QoS the cut was taken from.
        self.qos: Any = None

    def cut(self, consumer: Any, probes: int) -> None:
        qos = getattr(consumer, "qos", None)
        if qos is None or self.amount or not qos.value or qos.value <= probes:
            return
        before = qos.value
        qos.decrement_eventually(before - probes)
        self.amount, self.qos = before - qos.value, qos
        qos.update()

    def undo(self, consumer: Any) -> None:
        """Give the prefetch back, to the QoS it was taken from (if it is still the one)."""
        amount, taken_from = self.amount, self.qos
        self.amount, self.qos = 0, None
        if amount and taken_from is not None and getattr(consumer, "qos", None) is taken_from:
            consumer.qos.increment_eventually(amount)
            consumer.qos.update()


def _apply(
    consumer: Any,
    queue: str,
    mode: str,
    probes: int,
    consumed: set[str],
    redis: bool,
    cut: PrefetchCut,
) -> None:
    """On the event loop: consume ``queue`` (all of it, or the probes), or stop."""
    if mode == PROBE:
        cut.cut(consumer, probes)
    else:
        cut.undo(consumer)
    if mode != PAUSE:
        consumer.add_task_queue(queue)
        consumed.add(queue)
        if redis and consumer.task_consumer.consuming_from(RESTORE_QUEUE):
            consumer.cancel_task_queue(RESTORE_QUEUE)
        return
    if redis and consumed == {queue}:
        # The worker's last queue: keep a channel consuming, so kombu still
        # restores the unacknowledged messages of dead workers.
        consumer.add_task_queue(RESTORE_QUEUE)
    consumer.cancel_task_queue(queue)
    consumed.discard(queue)


def _breaker_of(task: Any) -> str | None:
    """A CircuitBreakerTask's breaker, else None (known by what it has: this module is
    imported by the task's, which it cannot import back)."""
    if getattr(type(task), "cbtasks_breaker_name", None) is None:
        return None
    return str(task.cbtasks_breaker_name)


def task_probes(task: Any) -> int:
    """The probe budget of ``task``'s breaker (the half-open consumer's prefetch)."""
    return int(task.cbtasks_breaker.policy.half_open_probes)


def pause_queues(app: Any) -> dict[str, Any]:
    """Each queue a defer="pause" task is routed to, with that task (one per queue)."""
    queues: dict[str, Any] = {}
    for task in list(app.tasks.values()):
        if _breaker_of(task) is not None and task.cbtasks_deferral.pauses_queue:
            queues.setdefault(queue_of(app, task), task)
    return queues


def queue_of(app: Any, task: Any) -> str:
    """The queue ``task`` is sent to by the app's routes (``task_routes``), else the default.

    (A task's own ``queue`` attribute is deprecated in Celery 5.7: route it instead.)
    """
    route = app.amqp.router.route({}, task.name, (), {})
    queue = route.get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue)


def queue_backlog(app: Any, queue: str) -> int | None:
    """How many messages wait in ``queue`` (the broker says: LLEN, a passive declare), or
    None if it cannot say now. A connection of its own: the gate's thread is not the
    consumer's."""
    try:
        with app.connection_for_read() as connection, connection.channel() as channel:
            declared = channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except Exception as exc:  # watching only: a broker that cannot say is no reason to fail
        log.debug("cannot count the messages in %r (%s)", queue, exc)
        return None


def consume_pause_queues(app: Any) -> None:
    """A worker started without ``-Q`` takes every paused queue of the app's tasks too.

    Celery's worker consumes the queues it is told (``-Q``) or, told none, the
    default queue and ``task_queues``: a queue that only ``task_routes`` names
    would never be consumed, and its tasks would stay PENDING. One told ``-Q``
    without a paused queue chose so: it is told what it leaves.
    """
    queues = app.amqp.queues
    # Told no -Q, Celery keeps no selection (its _consume_from is None) and consumes its
    # defaults, to which select_add adds (Celery 5.7's Queues).
    told_queues = getattr(queues, "_consume_from", None) is not None
    for queue, task in pause_queues(app).items():
        if not told_queues:
            queues.select_add(queue)
        elif queue not in queues.consume_from:
            log.warning(
                "queue %r of %s (defer='pause') is not consumed by this worker (-Q %s): its "
                "requests wait for a worker that takes it; add it to -Q",
                queue,
                task.name,
                ",".join(sorted(queues.consume_from)),
            )


def check_pause_queues(app: Any) -> None:
    """Refuse (PolicyError) a paused queue shared with a task of another breaker."""
    from .._errors import PolicyError

    for queue, owner in pause_queues(app).items():
        breaker = owner.cbtasks_breaker_name
        strangers = sorted(
            task.name
            for task in list(app.tasks.values())
            if not task.name.startswith("celery.")
            and queue_of(app, task) == queue
            and _breaker_of(task) != breaker
        )
        if strangers:
            raise PolicyError(
                f"queue {queue!r} belongs to breaker {breaker!r} (task {owner.name} pauses it "
                f"while the circuit is open), but {', '.join(strangers)} "
                f"{'is' if len(strangers) == 1 else 'are'} routed there too and would stop "
                f"with it: route {'it' if len(strangers) == 1 else 'them'} to another queue, "
                f"or use defer='countdown' or 'park'"
            )
