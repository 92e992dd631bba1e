"""An eager Celery app for the batch runner's own tests: no broker, no worker."""

from __future__ import annotations

from celery import Celery

app = Celery("batch-tests", set_as_current=False)
app.conf.update(task_always_eager=True, task_store_eager_result=False)
calls: list[str] = []


@app.task(bind=True, name="batch.double")
def double(self: object, x: float) -> float:
    """Twice x; the task ids it saw are kept for the tests."""
    calls.append(self.request.id)  # type: ignore[attr-defined]
    return 2 * x


# An app with a broker no worker consumes: its results never come.
idle = Celery("batch-idle", broker="memory://", backend="cache+memory://", set_as_current=False)


@idle.task(name="batch.never")
def never(x: float) -> float:
    """Never run: nothing consumes the in-memory broker."""
    return x


# An app whose broker is not there: nothing listens on port 1.
dead = Celery(
    "batch-dead", broker="redis://:secret@127.0.0.1:1/0", backend=None, set_as_current=False
)
dead.conf.update(broker_connection_timeout=1, broker_connection_retry=False)


@dead.task(name="batch.unsendable")
def unsendable(x: float) -> float:
    """Never sent: its broker is down."""
    return x
