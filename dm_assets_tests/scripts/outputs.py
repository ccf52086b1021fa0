"""A plain-argparse training script for the worker tests (no fastargs).

Spec: ``values`` float32 [4], ``flags`` bool_ [3]. ``main`` returns values derived from the index
(see :func:`expected`), or misbehaves as ``--script.mode`` says, for the indices in
``--script.bad`` (all indices when not given).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

import numpy as np

SPEC = {
    "num_models": 20,
    "schema": {
        "values": {"shape": [4], "dtype": "float32"},
        "flags": {"shape": [3], "dtype": "bool_"},
    },
}


def expected(index: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "values": (np.arange(4, dtype=np.float32) + index) * np.float32(scale),
        "flags": np.array([index % 2 == 0, index % 3 == 0, True]),
    }


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script.mode", dest="mode", default="ok")
    parser.add_argument("--script.scale", dest="scale", type=float, default=1.0)
    parser.add_argument("--script.bad", dest="bad", default=None)
    parser.add_argument("--script.argv_out", dest="argv_out", default=None)
    return parser.parse_args()  # strict: unknown arguments are an error, as for a real script


def main(index: int, logdir: str) -> dict[str, object]:
    args = _args()
    if args.argv_out:
        with open(args.argv_out, "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\n")
    out: dict[str, object] = dict(expected(index, args.scale))
    bad = args.bad is None or index in {int(i) for i in args.bad.split(",")}
    mode = args.mode if bad else "ok"
    if mode == "missing_key":
        del out["flags"]
    elif mode == "extra_key":
        out["surprise"] = np.zeros(2)
    elif mode == "completed_key":
        out["_completed"] = True
    elif mode == "bad_shape":
        out["values"] = np.zeros((1, 4), dtype=np.float32)
    elif mode == "float_into_bool":
        out["flags"] = np.array([0.5, 1.0, 0.0])
    elif mode == "nan":
        out["values"] = np.array([1.0, np.nan, 2.0, 3.0])
    elif mode == "raise":
        raise RuntimeError(f"training of model {index} blew up")
    elif mode == "not_a_dict":
        return [1, 2, 3]  # type: ignore[return-value]
    elif mode == "sleep":
        time.sleep(60)
    elif mode == "ignore_timeout":
        # a script stuck where signals cannot reach it (as inside a long C call)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    elif mode == "swallow":
        with contextlib.suppress(Exception):  # eating every Exception must not dodge the timeout
            time.sleep(60)
    with open(f"{logdir}/done.txt", "w") as f:
        f.write("ok")
    return out
