"""Benchmarks: tidegate against its peers (docs/benchmarks.md has the results and commands).

Not part of the installed package; run from the repository root with ``python -m bench.<name>``.
"""
