"""A training script written for the seed's worker, unchanged in kind: it declares a fastargs
section ``trainer`` and reads ``--trainer.multiple`` from the command line.

``main(index, logdir)`` returns ``{"random_numbers": uint8 (256,)}``, every entry ``multiple``.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

import numpy as np
from fastargs import Param, Section, get_current_config
from fastargs.decorators import param

Section("trainer").params(
    multiple=Param(int, "multiple", required=True),
)


def main(*_: Any, index: int, logdir: str) -> dict[str, np.ndarray]:
    make_config(quiet=True)
    return execute(index=index)


@param("trainer.multiple")
def execute(*_: Any, index: int, multiple: int) -> dict[str, np.ndarray]:
    return {"random_numbers": np.ones(256, dtype=np.uint8) * multiple}


def make_config(quiet: bool = False) -> None:
    config = get_current_config()
    parser = ArgumentParser()
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    config.validate(mode="stderr")
    if not quiet:
        config.summary()
