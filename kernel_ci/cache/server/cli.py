"""``kernel-ci cache serve|scrub``: the service's subcommands (registered by kernel_ci/cli/main.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        return int(float(number.removesuffix(unit) if unit else number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 50G)") from None


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def cmd_serve(args: argparse.Namespace) -> int:
    from kernel_ci.cache.server.server import READ_TOKENS_ENV, TOKENS_ENV, ServerConfig, env_tokens, serve
    from kernel_ci.cache.server.service import Limits

    config = ServerConfig(
        data=args.data,
        index_url=args.index,
        blobs_url=args.blobs,
        tokens=[*args.token, *env_tokens(TOKENS_ENV)],
        read_tokens=[*args.read_token, *env_tokens(READ_TOKENS_ENV)],
        anonymous_read=not args.no_anonymous_read,
        limits=Limits(max_bytes=args.max_bytes, max_blob_bytes=args.max_blob_bytes),
        limit_concurrency=args.limit_concurrency,
    )
    serve(config, args.host, args.port, workers=args.workers)
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    """Re-hash every blob at rest (reads do not re-hash large blobs): exit 1 if any was corrupt/missing."""
    from kernel_ci.cache.server.server import ServerConfig, make_service

    service = make_service(ServerConfig(data=args.data, index_url=args.index, blobs_url=args.blobs))
    problems = service.scrub()
    for digest, problem in problems:
        print(f"{problem}: {digest} (forgotten; re-upload it to heal the builds that use it)")
    print(f"scrub: {len(problems)} problem(s)")
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`cache serve` and `cache scrub`; returns the `cache` subcommands, to which kernel_ci.cli adds
    `cache bench` (the bench composes the service with nginx and wrk: not the service's own business)."""
    cache = sub.add_parser("cache", help="the shared build cache service").add_subparsers(
        dest="cache_command", required=True
    )
    serve = cache.add_parser(
        "serve", help="run the build cache service (build API, ccache storage, web page)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--data", type=Path, required=True, help="state directory (SQLite index, local blobs)")
    serve.add_argument(
        "--token",
        action="append",
        default=[],
        help="write token (repeatable; or comma-separated in $KERNEL_CI_CACHE_SERVER_TOKENS)",
    )
    serve.add_argument("--read-token", action="append", default=[], help="read-only token (repeatable)")
    serve.add_argument("--no-anonymous-read", action="store_true", help="reads need a token too")
    serve.add_argument("--index", help="postgresql://USER:PASS@HOST/DB (default: SQLite in --data)")
    serve.add_argument("--blobs", help="s3://BUCKET[/PREFIX]?endpoint=URL (default: a directory in --data)")
    serve.add_argument(
        "--max-bytes", type=_size, default=0, help="size cap (e.g. 50G) with LRU eviction; 0 = none"
    )
    serve.add_argument("--max-blob-bytes", type=_size, default=4 << 30, help="largest accepted blob")
    serve.add_argument("--workers", type=int, default=1, help="worker processes on the one port (default 1)")
    serve.add_argument(
        "--limit-concurrency",
        type=_positive,
        default=512,
        help="per worker: open connections + requests beyond which new requests get a 503 (default 512)",
    )
    serve.set_defaults(func=cmd_serve)
    scrub = cache.add_parser("scrub", help="re-hash every stored blob; forget the corrupt ones (cron this)")
    scrub.add_argument("--data", type=Path, required=True, help="state directory, as for serve")
    scrub.add_argument("--index", help="as for serve")
    scrub.add_argument("--blobs", help="as for serve")
    scrub.set_defaults(func=cmd_scrub)
    return cache
