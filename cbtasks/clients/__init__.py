"""Model endpoint clients that turn each answer into an outcome for the breaker.

They raise :class:`~cbtasks.EndpointFailure` for the endpoint's faults (which
count against a breaker) and :class:`~cbtasks.CallerError` for the caller's
(which the default policy ignores), so they work inside a CircuitBreaker or a
CircuitBreakerTask with no glue code.
"""

from ._health import HealthAnswer
from .http import HTTPModelClient, http_client

__all__ = ["GRPCModelClient", "HTTPModelClient", "HealthAnswer", "grpc_client", "http_client"]


def __getattr__(name: str) -> object:
    # grpcio is an optional extra: imported only when its client is asked for.
    if name in ("GRPCModelClient", "grpc_client"):
        from . import grpc

        return getattr(grpc, name)
    raise AttributeError(name)
