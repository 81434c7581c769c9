"""The `nudgefast serve` command: options, then uvicorn over the app."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MissingPackage


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model directory (default: the offline demo pair)")
    p.add_argument("--nudger", help="nudger (aligned) model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--served-model-name", default="nudgefast", help="the model id clients name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "gguf"])
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the base model across N processes (tensor parallelism; docs/PARALLEL.md)")
    p.add_argument("--max-running", type=int, default=None, help="requests decoded at once (engine default)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size per model, in tokens")
    p.add_argument("--flag-interval", type=int, default=None,
                   help="decode steps per engine round (engine default 16): a stream receives its tokens "
                        "in groups of up to this many; smaller streams more smoothly, larger batches more work")
    p.add_argument("--max-tokens-default", type=int, default=None,
                   help="max_tokens when a request gives none (default: the engine's, capped by the context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-pending", type=int, default=256, help="choices in flight before new requests get 503")


def engine_kwargs(args) -> dict:
    """Engine options given on the command line (absent ones keep the engine's defaults)."""
    kw = {}
    if args.kv_cache_tokens is not None:
        kw["kv_cache_tokens"] = args.kv_cache_tokens
    if args.max_running is not None:
        kw["max_running"] = args.max_running
    if args.flag_interval is not None:
        kw["flag_interval"] = args.flag_interval
    return kw


def check_args(args) -> None:
    for name in ("port",):
        v = getattr(args, name)
        if not 0 <= v <= 65535:
            raise ValueError(f"--port {v} must be in [0, 65535]")
    for name in ("max_running", "kv_cache_tokens", "flag_interval", "max_tokens_default", "max_body_bytes",
                 "max_pending"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v} must be >= 1")
    tp = args.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size {tp} must be >= 1")
    if tp > 1 and args.weights == "gguf":
        raise ValueError("--tensor-parallel-size > 1 shards dense weights: use --weights dense (or auto)")


def run_server(args, engine) -> int:
    """Serve `engine` until interrupted (Ctrl-C / SIGTERM stop it cleanly)."""
    try:
        import uvicorn

        from .app import ServerLimits, create_app
    except ImportError as e:
        raise MissingPackage(f"`nudgefast serve` needs the serve extra ({e.name} is missing): "
                             "pip install -e '.[serve]'") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_pending=args.max_pending,
                          default_max_tokens=args.max_tokens_default)
    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"nudgefast: warning: serving on {args.host} without --api-key", file=sys.stderr)
    print(f"nudgefast: serving {args.served_model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
