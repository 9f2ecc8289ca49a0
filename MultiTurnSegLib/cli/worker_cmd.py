"""``multiturnseg worker``: serve the model to remote clients (FastAPI on uvicorn)."""

from __future__ import annotations

import os
import sys

from ..errors import InputError

TOKEN_ENV = "MULTITURNSEG_WORKER_TOKEN"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "worker",
        help="serve the model to remote clients (Slicer, scripts) over HTTP",
        description=(
            "Load the model once and serve turns over HTTP. Listening beyond this machine "
            "(any --host other than 127.0.0.1/localhost/::1) requires a token. The token can "
            f"also come from the {TOKEN_ENV} environment variable."
        ),
    )
    p.add_argument("--model", required=True, metavar="MODEL.json", help="model description (model.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token clients must send (visible in the process list; prefer --token-file)")
    tok.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--ssl-certfile", metavar="CERT.pem", help="TLS certificate (serve https)")
    p.add_argument("--ssl-keyfile", metavar="KEY.pem", help="TLS private key")
    p.add_argument("--device", default="auto", help="where the model runs: auto (default), cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model precision (default: the engine's choice for the device)")
    p.add_argument("--load-in-4bit", action="store_true", help="quantize the language model to 4 bits (bitsandbytes)")
    p.add_argument("--cache-mb", type=float, default=2048, help="memory for cached slice sessions (image embeddings and key/value caches; GPU memory "
                        "on CUDA), in MB (default 2048; 0 disables caching)")
    p.add_argument("--max-in-flight", type=int, default=32, help="turns queued at once before answering 'busy'")
    p.add_argument("--max-side", type=int, default=4096, help="largest slice side accepted, in pixels")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    from ..backends.remote import is_loopback_host

    return is_loopback_host(host)


def resolve_token(args) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise InputError(f"cannot read the token file {args.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise InputError(f"the token file {args.token_file} is empty")
        return token
    if args.token is not None:
        if not args.token.strip():
            raise InputError("the token is empty")
        return args.token.strip()
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env or None


def check_args(args) -> str | None:
    """Validate everything that does not need the model; returns the token."""
    token = resolve_token(args)
    if token is None and not _is_loopback(args.host):
        raise InputError(
            f"refusing to listen on {args.host} without a token: anyone who can reach this machine could use "
            f"the model. Give --token-file FILE (or --token, or {TOKEN_ENV}), or listen on 127.0.0.1."
        )
    if token is not None and len(token) < 16 and not _is_loopback(args.host):
        print("multiturnseg worker: warning: the token is short (under 16 characters)", file=sys.stderr)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise InputError("--ssl-certfile and --ssl-keyfile go together")
    for f in (args.ssl_certfile, args.ssl_keyfile):
        if f and not os.path.isfile(f):
            raise InputError(f"TLS file not found: {f}")
    if not (0 <= args.port <= 65535):
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    if args.cache_mb < 0:
        raise InputError("--cache-mb must not be negative")
    if args.max_in_flight < 1:
        raise InputError("--max-in-flight must be at least 1")
    if not os.path.isfile(args.model):
        raise InputError(f"model description not found: {args.model}")
    return token


def run(args) -> int:
    token = check_args(args)

    import asyncio
    import logging

    try:
        import uvicorn

        from ..backends.local import LocalBackend
        from ..worker.server import WorkerLimits, create_app
    except ImportError as exc:
        raise InputError(
            f"the worker needs the 'worker' extra ({exc.name} is missing): pip install 'multiturnseg[worker]'"
        ) from None

    dtype = None if args.dtype == "auto" else args.dtype
    print(f"multiturnseg worker: loading {args.model} ...", file=sys.stderr, flush=True)
    backend = LocalBackend.from_model_json(
        args.model, device=args.device, dtype=dtype, load_in_4bit=args.load_in_4bit, cache_mb=args.cache_mb
    )
    limits = WorkerLimits(
        max_in_flight=args.max_in_flight,
        max_side=args.max_side,
        max_pixels=args.max_side * args.max_side,
    )
    app = create_app(backend, token=token, limits=limits)
    scheme = "https" if args.ssl_certfile else "http"
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_keep_alive=30,
        server_header=False,
        log_config=None,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.should_exit or not self.servers:
                return
            sock = self.servers[0].sockets[0]
            host, port = sock.getsockname()[:2]
            shown = host if ":" not in host else f"[{host}]"
            if host in ("0.0.0.0", "::"):
                shown = args.host if host == args.host else shown
            info = backend.info()
            print(
                f"multiturnseg worker: model {info.get('stage', '?')} on {info.get('device', '?')}; "
                f"auth {'required' if token else 'off (loopback only)'}",
                file=sys.stderr,
                flush=True,
            )
            print(f"multiturnseg worker: listening on {scheme}://{shown}:{port}", flush=True)

    server = _Server(config)
    try:
        asyncio.run(server.serve())
    finally:
        backend.close()
    if not server.started:
        raise InputError(f"the worker could not listen on {args.host}:{args.port} (address in use or not allowed?)")
    return 0
