"""``python -m cbtasks.server``: the reference model over HTTP, and over gRPC if asked."""

from __future__ import annotations

import argparse
import os

from ._model import IrisModel, ServerState
from .http import create_app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="cbtasks reference model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port (0: no gRPC)")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("CBTASKS_ADMIN_TOKEN") or None,
        help="serve /admin (faults, counts) to requests bearing this token "
        "(default: $CBTASKS_ADMIN_TOKEN; none: no /admin at all)",
    )
    args = parser.parse_args(argv)
    for name, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port < 65536 or (name == "--port" and port == 0):
            parser.error(f"{name} must be 1 to 65535, got {port}")
    state, model = ServerState(), IrisModel()
    grpc_server = None
    if args.grpc_port:
        from .grpc import serve

        # Kept in a variable: a gRPC server that is garbage-collected stops.
        grpc_server = serve(state, model, f"{args.host}:{args.grpc_port}")
    uvicorn.run(
        create_app(state, model, args.admin_token),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    if grpc_server is not None:
        grpc_server.stop(grace=1)


if __name__ == "__main__":
    main()
