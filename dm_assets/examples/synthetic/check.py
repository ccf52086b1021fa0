"""Check fitted synthetic datamodels against the planted truth.

    python -m dm_assets.examples.synthetic.check --datamodels=OUT_DIR --store=STORE

Prints, per target, the cosine between the fitted weights (on raw masks: ``weight / std``) and
the planted ones, and the R^2 on the held-out models (store rows 1200 and after). Exits 1 when a
cosine is below 0.95 or an R^2 below 0.8.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch

from dm_assets.examples.synthetic.train_synthetic import planted_weights
from dm_assets.store.store import Store

HELD_OUT_START = 1200


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dm_assets.examples.synthetic.check")
    parser.add_argument("--datamodels", required=True, help="compute_datamodels' out_dir")
    parser.add_argument("--store", required=True, help="the store the models were written to")
    args = parser.parse_args(argv)
    saved = torch.load(f"{args.datamodels}/datamodels.pt")
    raw = (saved["weight"] / saved["std"][:, None]).double().numpy()
    truth = planted_weights()
    with Store.open(args.store) as store:
        idx, masks = store.completed_rows("masks")
        _, margins = store.completed_rows("margins")
    held = idx >= HELD_OUT_START
    x = torch.from_numpy(masks[held]).float()
    pred = (((x - saved["mean"]) / saved["std"]) @ saved["weight"] + saved["bias"]).numpy()
    y = margins[held].astype(np.float64)
    r2 = 1 - ((pred - y) ** 2).mean(0) / y.var(0)
    ok = True
    for j in range(truth.shape[1]):
        cos = raw[:, j] @ truth[:, j] / np.linalg.norm(raw[:, j]) / np.linalg.norm(truth[:, j])
        print(
            f"target {j}: cosine to the planted weights {cos:.4f}, held-out R^2 {r2[j]:.3f} "
            f"({int(held.sum())} models)"
        )
        ok &= bool(cos >= 0.95 and r2[j] >= 0.8)
    print("synthetic check passed" if ok else "synthetic check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
