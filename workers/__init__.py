"""Celery app wiring and worker entry points for the examples, demo, tests and benchmarks."""
