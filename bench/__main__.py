"""``python -m bench --quick | --full | --smoke``: the benchmark suite (bench/suite.py)."""

from bench.suite import main

raise SystemExit(main())
