"""`monoscope serve PATH`: start the web app on localhost and print its URL."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from monoscope.errors import MonoscopeError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(subparsers: Any) -> None:
    """Register `monoscope serve` (called by monoscope.cli.build_parser)."""
    p = subparsers.add_parser(
        "serve", help="browse features, search and steer in a local web app",
        description="Serve a run folder (or an SAE folder with its features database) as a web app: the run's "
        "evaluation, a feature map, every feature's page, search by text, label and contrast, live activations "
        "and a steering playground. Binds to 127.0.0.1; any other --host requires a token.")
    p.add_argument("path", metavar="PATH", help="run folder (runs/NAME) or SAE folder with its features database")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--token", default=None,
                   help="require this token on every request (default: none on localhost; on any other --host a "
                        "random one is generated and printed)")
    p.add_argument("--model", default=None, help="model for the live panels (default: the one the SAE records)")
    p.add_argument("--device", default="auto", help="device for the live panels (default auto)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="model compute dtype for the live panels")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take (default 60)")
    p.add_argument("--coactivation-map", dest="coactivation_map", action="store_const", const=True, default="auto",
                   help="lay out every SAE's features by co-activation (UMAP of the co-occurrence graph) before "
                        "serving, whatever its size (default: done in the background for SAEs up to 32,768 "
                        "features, shown first once ready; ~3 min for 9,216 features on a CPU the first time, "
                        "cached after). It groups features that fire on the same tokens, which the decoder map "
                        "does not (benchmarks/map_quality.py)")
    p.add_argument("--no-coactivation-map", dest="coactivation_map", action="store_const", const=False,
                   help="only the decoder map of the features pass")
    p.add_argument("--compare", action="append", default=[], metavar="OTHER_SAE",
                   help="also serve this SAE folder (another run or width, with its features database), so every "
                        "feature page names its best match there by decoder cosine (repeatable; the SAEs of PATH "
                        "are compared with each other already)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from monoscope.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise MonoscopeError(f"--port {args.port} is not a port: pass 1 to 65535 (or 0 for a free one)")
    if not args.timeout > 0:
        raise MonoscopeError(f"--timeout {args.timeout} must be a positive number of seconds, e.g. 60")
    token = args.token
    if token is not None and len(token) < 8:
        raise MonoscopeError("--token is shorter than 8 characters: pass a longer one, or leave it out on a "
                             "non-local --host to get a random one")
    if token is None and args.host not in LOCAL_HOSTS:
        token = secrets.token_urlsafe(24)
    app = create_app(args.path, token=token, device=args.device, compute_dtype=args.compute_dtype,
                     model=args.model, timeout=args.timeout, coactivation_map=args.coactivation_map,
                     compare=args.compare)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise MonoscopeError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): pass another --port, "
                             "or stop what uses it") from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"monoscope serve: {url}", flush=True)
    if token and args.token is None:
        print("a token is required because --host is not this machine only; it is in the URL above",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, limit_concurrency=64)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
