"""The seed's ``worker`` command: ``python -m dm_assets.worker --worker.index=I ...``.

A thin entry point; the implementation (options, exit statuses, reports, the training
configuration each row records and ``--worker.on_change``) is :mod:`dm_assets.training.runner`.
"""

from dm_assets.cli import run
from dm_assets.training.runner import main

if __name__ == "__main__":
    run(main)
