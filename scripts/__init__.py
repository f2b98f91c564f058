"""Operator tools that run from a source checkout of lowcomm (not shipped in the wheel).

Run them from the repository root with ``python -m``: ``python -m scripts.bench.suite``
(the benchmark suite), ``python -m scripts.bench.wansim`` (the WAN simulator),
``python scripts/hivemind_probe.py`` (a swarm probe).
"""
