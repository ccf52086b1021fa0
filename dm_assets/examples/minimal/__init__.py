"""The seed's minimal example: 10 models, each returning 256 copies of ``--trainer.multiple``."""
