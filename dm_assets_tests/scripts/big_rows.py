"""Training script for the crash tests: large rows whose content says which run wrote them.

Spec from :func:`spec`. Row ``i`` written in generation ``g`` (``--gen``) is :func:`expected`.
"""

from __future__ import annotations

import argparse

import numpy as np

PAYLOAD = 1 << 19  # float64: 4 MiB per row, so a kill often lands mid-write
TAIL = 4093  # uint8, an odd size so rows straddle pages


def spec(num_models: int) -> dict:
    return {
        "num_models": num_models,
        "schema": {
            "generation": {"shape": [], "dtype": "int64"},
            "payload": {"shape": [PAYLOAD], "dtype": "float64"},
            "tail": {"shape": [TAIL], "dtype": "uint8"},
        },
    }


def expected(index: int, gen: int) -> dict[str, np.ndarray]:
    return {
        "generation": np.int64(gen),
        "payload": np.arange(PAYLOAD, dtype=np.float64) * (gen + 1) + index,
        "tail": ((np.arange(TAIL) + 7 * index + 13 * gen) % 251).astype(np.uint8),
    }


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen", type=int, required=True)
    gen = parser.parse_args().gen
    return expected(index, gen)
