"""The ``kvmmap`` console script."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmmap", description="Paged, quantized KV-cache files: demo and tools."
    )
    parser.add_argument("--version", action="version", version=f"kvmmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the end-to-end demo on built-in data")
    demo.add_argument("--workdir", help="where to write the demo's files (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(args.workdir)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
