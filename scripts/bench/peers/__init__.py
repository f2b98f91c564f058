"""Peer baselines: other libraries' low-communication optimizers on lowcomm's task.

Each baseline is a command, run from the repository root::

    .venv-torchft/bin/python -m scripts.bench.peers.torchft_diloco --config ... --out F.jsonl
    .venv/bin/python -m scripts.bench.peers.hivemind_optimizer --config ... --out F.jsonl

They share everything but the library: the command line and summary output (``command``),
the forked workers and their messages (``workers``), and one training loop (``loop``: the
recipe's model, data, AdamW, schedule and evaluation). A library module only says how it
wraps the inner optimizer and communicates (a ``loop.PeerOptimizer``).
"""
