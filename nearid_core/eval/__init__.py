"""The paper's benchmarks (`python -m nearid_core.eval`): pure metrics in `metrics`, runs in `benchmarks`, comparison
embedders in `baselines`."""
