"""The ``fastp2phd`` command line: ``fastp2phd <command> [options]``."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastp2phd", description="pix2pixHD as a fast PyTorch library")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    commands.add_parser("info", help="print versions, devices and which fast paths are available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .diagnostics import info

        info()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
