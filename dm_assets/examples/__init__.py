"""Training scripts: ``minimal`` (the seed's smoke test), ``synthetic`` (a planted answer),
``noop`` (no work: orchestration overhead), ``digits`` (real data, the main job), ``cifar10``
(the seed's CIFAR-10 example)."""
