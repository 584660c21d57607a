"""Command line: ``localmap demo`` (also ``python -m localmap demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localmap", description="Per-shard code inside global PyTorch programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a tensor-parallel block on a simulated mesh against one device")
    demo.add_argument("--ranks", type=int, default=4, help="ranks of the simulated 1-D mesh (default 4)")
    demo.add_argument("--tokens", type=int, default=10, help="tokens (rows); uneven across ranks by default")
    demo.add_argument("--dim", type=int, default=16)
    demo.add_argument("--hidden", type=int, default=32, help="hidden size, divisible by --ranks")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.ranks < 1 or args.hidden % args.ranks:
            parser.error(f"--hidden ({args.hidden}) must be a multiple of --ranks ({args.ranks})")
        from .demo import run_demo

        ok = run_demo(args.ranks, args.tokens, args.dim, args.hidden, args.seed)
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
