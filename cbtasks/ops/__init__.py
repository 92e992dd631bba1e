"""Tools around the library for operators: the CLI, batch inference, metrics, the demo.

``cli`` (the ``cbtasks`` command), ``batch`` (resumable batch inference through
Celery), ``metrics`` (Prometheus counters and the fleet's state read from
Redis), ``demo`` (``make demo``).
"""
