"""Helpers that start real servers for tests, the demo and benchmarks."""
