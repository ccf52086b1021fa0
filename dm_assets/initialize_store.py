"""Create (or reopen) a store from a spec: the seed's ``initialize_store`` command.

    python -m dm_assets.initialize_store --logging.logdir=DIR --logging.spec=SPEC.json

Creates ``DIR/<key>.npy`` for every schema key and ``DIR/_completed.npy``, sparse, and copies
the spec to ``DIR/spec.json``. Rerunning with the same spec keeps every row; a different spec is
refused with the differences listed and nothing changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dm_assets.cli import configure_logging, make_parser, run
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store

logger = logging.getLogger(__name__)


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m dm_assets.initialize_store"
) -> int:
    parser = make_parser(prog, "Create (or reopen) a datamodels store from a spec JSON file.")
    parser.add_argument(
        "--logging.logdir",
        dest="logdir",
        required=True,
        help="store directory (created if missing)",
    )
    parser.add_argument(
        "--logging.spec",
        dest="spec",
        required=True,
        help='spec JSON: {"num_models": N, "schema": {KEY: {"shape", "dtype"}}}',
    )
    args = parser.parse_args(argv)
    configure_logging()
    spec = Spec.load(args.spec)
    with Store.initialize(args.logdir, spec) as store:
        status = store.status()
        logger.info("store ready at %s: %s", store.path, status)
        for key, entry in spec.schema.items():
            logger.info(
                "  %s.npy: shape %s dtype %s",
                key,
                [spec.num_models, *entry.shape],
                entry.dtype.name,
            )
    return 0


if __name__ == "__main__":
    run(main)
