"""Training scripts: ``minimal`` (the seed's smoke test)."""
