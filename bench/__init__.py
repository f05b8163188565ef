"""kdops benchmarks: `python -m bench` (see README)."""
