"""Score any attribution method by LDS on an experiment's held-out models.

    python -m dm_assets.score EXPERIMENT --scores FILE [--fit FIT_DIR] [--json]
                              [--bootstrap N] [--seed S]

FILE is a .npy float array (p, t): p training examples (the masks' length), t targets (the
fit's, or every target before a fit); row j column i is the score of training example j for
target i, higher meaning the example raises the target's output. Held-out model m is
predicted by masks[m] @ scores. A fit's datamodels.pt is accepted too (scored as
weight / std[:, None], our own prediction less a per-target constant, so its LDS equals the
fit's). The held-out models are the fit's (FIT_DIR, else the experiment's latest fit, from its
manifest), or without a fit the completed models from index num_train + num_val on. Prints the LDS
with its 95% interval (resampling held-out masks), the noise ceiling and LDS / ceiling, and
what was scored (see :mod:`dm_assets.evaluation.score`). Exits 2 for an unknown experiment,
a missing or misshapen scores file, non-finite scores, or fewer than 3 held-out models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dm_assets.cli import EXIT_USAGE, add_flag, make_parser, run
from dm_assets.errors import DmError


def main(argv: Sequence[str] | None = None) -> int:
    from dm_assets.evaluation.score import resolve_experiment, score_attributions

    first, _, rest = __doc__.partition("\n\n")
    parser = make_parser("python -m dm_assets.score", first)
    parser.epilog = rest.partition("\n\n")[2]  # the file format, after the usage lines
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("experiment", help="an experiment's name or its YAML file")
    parser.add_argument(
        "--scores",
        required=True,
        metavar="FILE",
        help="attributions: .npy (p training examples, t targets), or a datamodels.pt",
    )
    parser.add_argument(
        "--fit",
        metavar="FIT_DIR",
        default=None,
        help="fit folder whose manifest says which models are held out (default: the "
        "experiment's latest fit; without one, the experiment's num_train + num_val)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="resamples of held-out masks for the 95%% intervals (0: none; default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    add_flag(parser, "--json", "print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap {args.bootstrap}: use 0 (no intervals) or more")
    try:
        result = score_attributions(
            resolve_experiment(args.experiment),
            args.scores,
            fit_dir=args.fit,
            resamples=args.bootstrap,
            seed=args.seed,
        )
    except DmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0


if __name__ == "__main__":
    run(main)
