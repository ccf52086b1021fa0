"""Print how far a store is: ``python -m dm_assets.status --logging.logdir=DIR``.

Prints the completed count and the missing index ranges; ``--json`` prints them as JSON.
Exits 0 whether or not the store is complete (this is a report, not a check) unless
``--require_complete`` is given, then 1 while any model is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dm_assets.cli import add_flag, make_parser, run
from dm_assets.store.store import Store


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m dm_assets.status", "Report a store's completed models.")
    parser.add_argument("--logging.logdir", dest="logdir", required=True, help="store directory")
    add_flag(parser, "--json", "print JSON instead of text")
    add_flag(parser, "--require_complete", "exit 1 while any model is not completed")
    args = parser.parse_args(argv)
    with Store.open(args.logdir) as store:
        status = store.status()
    if args.json:
        print(
            json.dumps(
                {
                    "num_models": status.num_models,
                    "completed": status.completed,
                    "missing_ranges": [list(r) for r in status.missing_ranges],
                }
            )
        )
    else:
        print(status)
    return 1 if args.require_complete and status.completed < status.num_models else 0


if __name__ == "__main__":
    run(main)
