"""Print the lineage of a fit, from its evaluation back to code.

    python -m dm_assets.lineage EXPERIMENT_OR_FIT_FOLDER [--json]

eval -> fit (manifest) -> dataset -> model indices -> training configurations (with their
args) -> code versions, with the Dagster and MLflow run ids (see
:mod:`dm_assets.pipeline.provenance`). Exits 2 for an unknown experiment, an experiment not
fitted yet, or a fit folder without a manifest.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from dm_assets.cli import EXIT_USAGE, add_flag, make_parser, run


def main(argv: Sequence[str] | None = None) -> int:
    from dm_assets.pipeline.provenance import LineageError, lineage_facts, render_lineage

    parser = make_parser("python -m dm_assets.lineage", __doc__.split("\n\n")[0])
    parser.add_argument("target", help="an experiment's name (its latest fit) or a fit folder")
    add_flag(parser, "--json", "print the facts as JSON instead of text")
    args = parser.parse_args(argv)
    try:
        facts = lineage_facts(args.target)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(facts, indent=2) if args.json else render_lineage(facts))
    return 0


if __name__ == "__main__":
    run(main)
