"""Alias of :mod:`dm_assets.initialize_store`, the name the seed's README uses."""

from __future__ import annotations

from functools import partial

from dm_assets.cli import run
from dm_assets.initialize_store import main

if __name__ == "__main__":
    run(partial(main, prog="python -m dm_assets.initialize_logdir"))
