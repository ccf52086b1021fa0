"""The data: a spec (``spec.json``), the rows a model returns, and the memory-mapped store.

``Store`` (``store.py``) owns the files on disk, including which training configuration wrote
each row; ``Spec`` (``spec.py``) says what a row holds; ``coerce_row`` (``rows.py``) checks a
script's returned values against it.
"""

from dm_assets.store.spec import COMPLETED_KEY, CONFIGURATION_KEY, ArraySpec, Spec, SpecError
from dm_assets.store.store import Store, StoreError

__all__ = [
    "COMPLETED_KEY",
    "CONFIGURATION_KEY",
    "ArraySpec",
    "Spec",
    "SpecError",
    "Store",
    "StoreError",
]
