"""Write a store's completed rows as an FFCV dataset: the seed's ``write_dataset`` command.

    python -m dm_assets.regression.write_dataset --cfg.data_dir=STORE --cfg.out_path=OUT.beton
        [--cfg.x_name=masks] [--cfg.y_name=margins] [--cfg.y_slice=J]
        [--cfg.completed_name=_completed] [--cfg.ignore_completed] [--cfg.num_workers=N]

``--cfg.out_dir=DIR`` (the seed's option) writes ``DIR/regression_data.beton`` instead of
``--cfg.out_path``; give one of the two. (The seed accepted ``out_dir`` but wrote
``regression_data.beton`` inside ``data_dir`` whatever it said; pass ``--cfg.out_dir=STORE``
for that file.) The fields written are described in :mod:`dm_assets.regression.beton`.

Exit status: 0 when the dataset was written; 1 when the inputs do not fit (the message, after
``error:``, says what and how to fix it; nothing is written under the final name); 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dm_assets.cli import EXIT_FAILED, add_flag, configure_logging, make_parser, run
from dm_assets.regression.beton import SEED_BETON_NAME, BetonError
from dm_assets.regression.beton_writer import write_beton
from dm_assets.store.spec import COMPLETED_KEY


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "python -m dm_assets.regression.write_dataset",
        "Write a store's completed rows (masks and targets) as an FFCV dataset (.beton).",
    )
    parser.add_argument("--cfg.data_dir", dest="data_dir", required=True, help="store directory")
    parser.add_argument(
        "--cfg.out_path", dest="out_path", default=None, help="the .beton file to write"
    )
    parser.add_argument(
        "--cfg.out_dir",
        dest="out_dir",
        default=None,
        help=f"instead of --cfg.out_path: write DIR/{SEED_BETON_NAME} (the seed's option)",
    )
    parser.add_argument(
        "--cfg.x_name", dest="x_name", default="masks", help="mask key (default: masks)"
    )
    parser.add_argument(
        "--cfg.y_name", dest="y_name", default="margins", help="targets key (default: margins)"
    )
    parser.add_argument(
        "--cfg.y_slice",
        dest="y_slice",
        type=_non_negative_int,
        default=None,
        help="write only this target column (default: every column)",
    )
    parser.add_argument(
        "--cfg.completed_name",
        dest="completed_name",
        default=COMPLETED_KEY,
        help=f"completion flags, <name>.npy in the store (default: {COMPLETED_KEY})",
    )
    add_flag(parser, "--cfg.ignore_completed", "write every model's row, completed or not")
    parser.add_argument(
        "--cfg.num_workers",
        dest="num_workers",
        type=_positive_int,
        default=None,
        help="writer threads (default: the CPU count, at most 8; one for a small dataset)",
    )
    add_flag(parser, "--verbose", "log debug messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.out_path is None) == (args.out_dir is None):
        parser.error("give exactly one of --cfg.out_path=FILE.beton and --cfg.out_dir=DIR")
    out_path = Path(args.out_path) if args.out_path else Path(args.out_dir) / SEED_BETON_NAME
    configure_logging(args.verbose)
    try:
        # logs the summary: rows, model index range, bytes and seconds
        write_beton(
            args.data_dir,
            out_path,
            x_name=args.x_name,
            y_name=args.y_name,
            y_slice=args.y_slice,
            completed_name=args.completed_name,
            ignore_completed=args.ignore_completed,
            num_workers=args.num_workers,
        )
    except BetonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    run(main)
