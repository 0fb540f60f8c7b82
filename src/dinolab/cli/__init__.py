"""``dinolab`` command line: one thin subcommand per job, each calling one library function.

Errors meant for the user (missing weights, bad input folders, unreadable or corrupt files, a full
disk, out of memory ...) end the command with one line on stderr, naming the file where it is known,
and exit code 2; any other exception is reported the same way as an internal error with exit code 1.
``--debug`` (before or after the command) also prints the Python traceback.

Each group of subcommands lives in its own module (``backbone``, ``learn``, ``retrieval``, ``dense``,
``serve``) with its ``cmd_*`` functions and an ``add_parsers(sub)`` that declares them; the flags
they share are defined once in ``common``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import traceback

from dinolab.cli import backbone, dense, learn, retrieval, serve
from dinolab.cli.common import add_debug_everywhere
from dinolab.errors import DinolabError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


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
    add_debug_everywhere(ap)
    return ap


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that bad input, the file system or the machine cause (not bugs in dinolab)."""
    errors: list[type[BaseException]] = [DinolabError, ValueError, OSError, MemoryError, EOFError,
                                         pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover  (a declared dependency)
        pass
    try:
        import yaml

        errors.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    import torch

    errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def error_line(e: BaseException) -> str:
    """One line saying what went wrong, with the file when the exception knows it."""
    if isinstance(e, DinolabError):
        msg = str(e)
    elif isinstance(e, OSError):  # FileNotFoundError, PermissionError, ENOSPC ...
        msg = f"{e.filename}: {e.strerror or e}" if e.filename is not None else str(e) or type(e).__name__
    elif isinstance(e, MemoryError):
        msg = "out of memory (MemoryError): the input is too large for this machine"
    else:
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return " ".join(msg.split())  # one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if args.verbose or debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error ends in one line; --debug adds the traceback)
        if debug:
            traceback.print_exc()
        if isinstance(e, _expected_errors()):
            print(f"error: {error_line(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: internal error, {error_line(e)} (re-run with --debug for the traceback, and please "
              "report it)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
