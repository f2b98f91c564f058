"""lowcomm's benchmarks: what each training method sends, how good the model gets, how fast it
trains under a shaped link, next to synchronous data parallelism and the peer libraries; and
how fast each codec encodes and decodes.

Run from the repository root of a source checkout (the package is not in the wheel)::

    .venv/bin/python -m scripts.bench.suite --help     # the suite (also `make bench`, `lowcomm bench`)
    .venv/bin/python -m scripts.bench.codecs           # codec bandwidth against memcpy
    .venv/bin/python -m scripts.bench.report           # BENCHMARKS.md from the results files
    sudo .venv/bin/python -m scripts.bench.wansim ...  # the WAN simulator on its own

Modules, one concept each:

========================  ===================================================================
``suite``                 the suite's settings, phases (quality, throughput, peers) and CLI
``methods``               method names (``diloco-h20-int8``) and the recipe options they set
``profiles``              the benchmark matrices (``smoke``, ``default``, ``headline``,
                          ``throughput``, ``tune``, ``tune-long``)
``launch``                one run: a process per worker, on loopback or in the simulator
``aggregate``             per-run records into tables (means, paired ratios, headline rows)
``timelines``             the workers' timelines as numbers: time per span kind, waiting for
                          a slower worker, the excerpts the plots draw
``plots``                 the PNGs
``report``                ``BENCHMARKS.md``, generated from results files only
``readme_table``          the README's tables, printed from the same results
``machine``               what the numbers were measured on
``codecs``                codec encode/decode bandwidth against memcpy
``grid``                  a tuning grid's table and heat maps (``tune*`` profiles)
``sparseloco``            our sparse path against SparseLoCo's reference, difference by difference
``wansim``, ``topology``  network namespaces behind ``tc tbf`` links; its names and commands
``peers``                 torchft's and hivemind's optimizers on the same task (one loop),
                          forked on loopback or one process per host behind the links
========================  ===================================================================
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO"]

#: The source checkout this package runs from: recipes, configs and results are found here.
REPO = Path(__file__).resolve().parents[2]
