"""Shared pieces of the seed-compatible command lines (``--section.key=value`` options)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dm_assets.errors import DmError

EXIT_USAGE = 2
EXIT_FAILED = 1

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def parse_bool(text: str) -> bool:
    """``"1"``, ``"true"``, ``"yes"`` ... as True; ``"0"``, ``"false"``, ``"no"`` ... as False."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0); got {text!r}")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: a pass-through option must never be taken for a prefix of ours
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def add_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A boolean option usable bare (``--a.b``) or with a value (``--a.b=0``); its dest is the
    part after the last dot (``--worker.do_if_complete`` -> ``do_if_complete``)."""
    parser.add_argument(
        name,
        dest=name.lstrip("-").rsplit(".", 1)[-1],
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        help=help,
    )


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a CLI's ``main``, turning the library's errors into a message and a non-zero exit."""
    try:
        code = main(argv)
    except DmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    sys.exit(code)
