"""lowcomm's reliability harness: faults forced on real runs, and invariants checked on them.

Run from the repository root of a source checkout (the package is not in the wheel)::

    .venv/bin/python -m scripts.reliability.soak --help       # churn soak of a 4-peer swarm
    .venv/bin/python -m scripts.reliability.restarts --help   # torchrun --max-restarts, ranks killed
    .venv/bin/python -m scripts.reliability.robust --help     # 1 of 4 peers sends garbage
    .venv/bin/python -m scripts.reliability.mutate --help     # planted bugs against the tests
    .venv/bin/python -m scripts.reliability.report            # RELIABILITY.md from the results

Modules, one concept each:

==================  =======================================================================
``events``          the seeded fault schedule (kills, stalls, leaves, joins): pure
``swarm``           a loopback swarm: a bootstrap DHT and ``lowcomm join`` peer processes
``invariants``      the soak's invariants over the peers' per-round records: pure
``soak``            the churn soak (a run with faults and one without) and its results
``restarts``        torchrun restarts against an uninterrupted run, bit for bit
``robust``          robust aggregation against one peer sending scaled noise
``mutate``          small planted bugs in ``optim/`` and ``comm/``, killed or survived
``report``          ``RELIABILITY.md`` and its figure, from the results files only
==================  =======================================================================

Results go to ``benchmarks/reliability/*.json`` (one file per harness); the report reads
only those.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO", "RESULTS_DIR"]

#: The source checkout this package runs from.
REPO = Path(__file__).resolve().parents[2]
#: Where each harness writes its results file, and the report reads them.
RESULTS_DIR = REPO / "benchmarks" / "reliability"
