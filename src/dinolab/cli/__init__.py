"""``dinolab`` command line: one thin subcommand per job, each calling one library function.

Errors meant for the user (missing weights, bad input folders ...) end the command with one line
on stderr and exit code 2, never a stack trace.

Each group of subcommands lives in its own module (``backbone``, ``learn``, ``retrieval``, ``dense``,
``serve``) with its ``cmd_*`` functions and an ``add_parsers(sub)`` that declares them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dinolab.cli import backbone, dense, learn, retrieval, serve
from dinolab.errors import DinolabError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dinolab", description="DINOv2 re-created: frozen features from official or "
                                 "own backbones, self-supervised pretraining, classification / segmentation / "
                                 "depth heads, retrieval and data curation, a web demo. `dinolab <command> "
                                 "--help` explains each command.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    backbone.add_parsers(sub)
    learn.add_parsers(sub)
    retrieval.add_parsers(sub)
    dense.add_parsers(sub)
    serve.add_parsers(sub)
    backbone.add_convert_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except DinolabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
