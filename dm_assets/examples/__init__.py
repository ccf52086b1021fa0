"""Training scripts: ``minimal`` (the seed's smoke test), ``synthetic`` (a planted answer)."""
