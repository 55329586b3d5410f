"""Benchmarks: each module runs with ``python -m bench.NAME`` from the repository root and writes
``bench/results/NAME.{json,md,png}``; ``python -m bench.report`` builds ``docs/RESULTS.md`` from them."""
