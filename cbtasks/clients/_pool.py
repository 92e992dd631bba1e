"""One client per target per process: connection pools are not shared across a fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_clients: dict[tuple[str, str], object] = {}
_pid = os.getpid()
_lock = threading.Lock()


def per_process(kind: str, target: str, make: Callable[[str], T]) -> T:
    """The process's client of ``kind`` for ``target``, made on first use (again after a fork)."""
    global _pid
    with _lock:
        if _pid != os.getpid():
            # Connections inherited across a fork are shared with the parent: start afresh.
            _clients.clear()
            _pid = os.getpid()
        client = _clients.get((kind, target))
        if client is None:
            client = _clients[(kind, target)] = make(target)
        return client  # type: ignore[return-value]
