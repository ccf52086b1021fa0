"""The seed's check of the minimal example, for a store where every model ran.

    python -m dm_assets.examples.minimal.check --checking.logdir=DIR --trainer.multiple=2

Exits 0 when every model is completed and every row is 256 copies of ``multiple``; otherwise
prints what is wrong and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from dm_assets.cli import make_parser
from dm_assets.store.store import Store


def check(logdir: str, multiple: int) -> list[str]:
    """Problems found in the minimal example's store at ``logdir`` (empty when it is right)."""
    problems = []
    with Store.open(logdir) as store:
        status = store.status()
        if status.completed != status.num_models:
            problems.append(f"not every model completed: {status}")
        rows = np.load(f"{logdir}/random_numbers.npy", mmap_mode="r")
        expected = np.full(256, multiple, dtype=np.uint8)
        wrong = [int(i) for i in store.completed_indices() if not (rows[i] == expected).all()]
        if wrong:
            problems.append(f"rows {wrong} are not 256 copies of {multiple}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m dm_assets.examples.minimal.check", __doc__ or "")
    parser.add_argument("--checking.logdir", dest="logdir", required=True)
    parser.add_argument("--trainer.multiple", dest="multiple", type=int, required=True)
    args = parser.parse_args(argv)
    problems = check(args.logdir, args.multiple)
    for problem in problems:
        print(f"check failed: {problem}", file=sys.stderr)
    if not problems:
        print("checks all passed!")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
