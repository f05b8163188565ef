"""kdops benchmarks: `python -m bench` (see docs/performance.md)."""
