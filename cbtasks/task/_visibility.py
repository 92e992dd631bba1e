"""How long a message may stay unacknowledged in a worker before the broker delivers it again.

Redis (and SQS) deliver a message again once it has been unacknowledged for
the visibility timeout (``broker_transport_options``; kombu's Redis default is
an hour). A message the worker still holds then exists twice. cbtasks keeps
what it holds to half of that: a countdown is re-published before it, and the
completion guard looks at a message held longer (its other copy may have run).
"""

from __future__ import annotations

import celery

#: kombu's Redis transport's default.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: The share of the visibility timeout a held message is safe for: the rest
#: covers the clocks of the worker that delivered it and the one that restores it.
SAFE_SHARE = 0.5


def safe_hold(app: celery.Celery) -> float:
    """Seconds a worker may hold a message before its redelivery is possible."""
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)) * SAFE_SHARE
