"""Request bodies as strict JSON: what cannot be encoded is the caller's error."""

from __future__ import annotations

import json
from typing import Any

from .._errors import CallerError


def encode_request(payload: Any) -> bytes:
    """``payload`` as JSON bytes; CallerError for NaN, Infinity or a value JSON cannot hold.

    Encoding happens before any call, so a request that cannot be sent never
    counts against the shared breaker (six such tasks used to keep it open).
    """
    try:
        return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise CallerError(
            f"the request cannot be sent as JSON ({exc}); send finite numbers, strings, "
            "lists and objects only"
        ) from None
