"""Celery app wiring and worker entry points.

Empty until the CircuitBreakerTask issue lands: the Celery app, its config
from the environment and the inference task will live here.
"""
