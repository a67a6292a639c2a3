"""Ember's benchmarks, run with `ember bench NAME`; each writes benchmarks/results/NAME.json."""
