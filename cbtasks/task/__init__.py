"""The Celery integration: ``CircuitBreakerTask`` and what it is made of.

Modules, one job each: ``_task`` (the base class and its run), ``_options``
(options, defaults, validation), ``_deferral`` (countdown and parked forms
of a deferred request), ``_releaser`` (re-publishing parked requests),
``_completion`` (no second call for a completed task id).
"""

from ._task import CircuitBreakerTask

__all__ = ["CircuitBreakerTask"]
