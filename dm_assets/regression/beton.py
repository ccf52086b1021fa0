"""The FFCV dataset (``.beton``) of the store's completed rows: its format and its error.

Every row of the dataset is one trained model. The fields, in this order:

===========  ===========================  =================================================
field        FFCV type, per-row shape     content
===========  ===========================  =================================================
``mask``     ``NDArrayField``,            the model's training-set mask (the store's ``x``
             ``(n_features,)``            key), in that key's dtype (bool, or 0/1 integers)
``targets``  ``NDArrayField`` float32,    the model's outputs (the store's ``y`` key, cast to
             ``(n_targets,)``             float32); one column, shape ``(1,)``, with
                                          ``y_slice``; a scalar ``y`` is one target
``idx``      ``IntField`` (int64)         the model's index in the store
===========  ===========================  =================================================

Rows are the completed models in increasing model index (every model with
``ignore_completed``), so ``idx`` increases strictly down the file. These are the seed's field
names and types: the seed's ``regression_data.beton`` reads here.

The dataset's parts, one module each:

- :mod:`dm_assets.regression.beton_format`: FFCV's file format in numpy alone (header, fields,
  row metadata, pages, allocation table) and where our rows go in it;
- :mod:`dm_assets.regression.beton_writer`: :func:`~dm_assets.regression.beton_writer.write_beton`
  checks the store and writes the file (what ``python -m dm_assets.regression.write_dataset``
  runs);
- :mod:`dm_assets.regression.beton_reader`: :class:`~dm_assets.regression.beton_reader.BetonSource`
  reads it back in batches for the solvers, and
  :func:`~dm_assets.regression.beton_reader.beton_info` describes a file.

None of them imports FFCV (seconds of numba compilation at import): the files are FFCV's
format, checked against FFCV's own writer, Reader and Loader by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dm_assets.errors import DmError

# The seed's field names (module doc).
MASK_FIELD = "mask"
TARGETS_FIELD = "targets"
IDX_FIELD = "idx"
# The file name the seed's write_dataset gives its dataset (inside the store).
SEED_BETON_NAME = "regression_data.beton"
# The seed's targets field is float32.
TARGET_DTYPE = np.dtype(np.float32)
# At most this many model indices are named in one error message.
MAX_NAMED = 10


class BetonError(DmError, ValueError):
    """A dataset cannot be written or read as asked; the message says what and how to fix it."""


def named_indices(indices: Sequence[int] | np.ndarray, total: int) -> str:
    """The first few of ``indices`` (integers: model indices or row positions) as text for an
    error message, with how many more there are of ``total``: ``"3, 7 and 12 more"``."""
    shown = ", ".join(str(int(i)) for i in indices[:MAX_NAMED])
    more = f" and {total - MAX_NAMED} more" if total > MAX_NAMED else ""
    return f"{shown}{more}"
