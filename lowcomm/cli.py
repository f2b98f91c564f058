"""The ``lowcomm`` command.

::

    lowcomm train [--config demo|tiny|FILE] [--key=value ...]          # the recipe, one process
    lowcomm dht [--host 0.0.0.0] [--port 31337] [--addrs-file F]       # a bootstrap node
    lowcomm join --initial-peers ADDR [--run-id ID] [--run-key-file F] [recipe options ...]
                                                                       # a volunteer peer
    lowcomm bench [bench_suite options ...]                            # the benchmark suite
    lowcomm COMMAND --help                                             # a command's options

``train`` and ``join`` run the recipe ``lowcomm.recipes.train_lm`` (shipped in the package, as
are its configs ``demo`` and ``tiny``); ``join`` is ``train`` with the hivemind backend. A
bootstrap DHT only introduces peers and carries no training data, so it needs no run key: the
peers of a private run share theirs (``--run-key-file`` or ``LOWCOMM_RUN_KEY``) and
authenticate each other. ``bench`` needs a source checkout (it runs ``scripts/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str, explicit: str | None) -> ModuleType:
    # Only for `bench`: scripts/ is not part of the package (DESIGN.md), so it needs a checkout.
    path = Path(explicit) if explicit else _ROOT / name
    if not path.is_file():
        raise SystemExit(
            f"lowcomm: {name} not found at {path}; run from a source checkout of lowcomm or "
            f"pass its path with --script"
        )
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name V`` / ``--name=V`` from ``argv``; return V."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def cmd_train(argv: list[str]) -> int:
    """Run the training recipe with ``argv`` as its options."""
    # Imported here, not at the top: torch and the recipe load only for the commands that train.
    from lowcomm.recipes import train_lm

    _logging()
    train_lm.main(argv)
    return 0


def cmd_join(argv: list[str]) -> int:
    """Run the recipe as a volunteer peer over hivemind."""
    if _wants_help(argv):
        print(
            "usage: lowcomm join --initial-peers ADDR[,ADDR...] [--run-id ID] "
            "[--run-key-file F] [recipe options ...]\n\n"
            "The recipe (`lowcomm train`) as a volunteer peer of a hivemind swarm: ADDR is a\n"
            "multiaddr `lowcomm dht` printed; peers with the same --run-id (and run key)\n"
            "train together. The recipe's options follow.\n"
        )
        return cmd_train(["--help"])
    if not any(a == "--initial-peers" or a.startswith("--initial-peers=") for a in argv):
        print(
            "lowcomm: error: join needs --initial-peers ADDR (the multiaddr printed by "
            "`lowcomm dht`)",
            file=sys.stderr,
        )
        return 2
    return cmd_train(["--backend", "hivemind", *argv])


def cmd_dht(argv: list[str]) -> int:
    """Start a bootstrap DHT node, print its addresses, serve until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(prog="lowcomm dht", description=cmd_dht.__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="other bootstrap nodes")
    parser.add_argument(
        "--announce-host", default=None, help="public address to announce (behind NAT)"
    )
    parser.add_argument(
        "--addrs-file",
        default=None,
        help="also write the multiaddrs there, one per line, once the node is up (for scripts "
        "that start peers after it)",
    )
    args = parser.parse_args(argv)
    _logging()
    from lowcomm.comm.hivemind import start_bootstrap_dht

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    announce = [f"/ip4/{args.announce_host}/tcp/{args.port}"] if args.announce_host else None
    dht, addrs = start_bootstrap_dht(
        host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"],
        announce_maddrs=announce,
        initial_peers=args.initial_peers,
    )
    # After the DHT starts: hivemind installs handlers of its own while it starts.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.addrs_file:
            # Whole or not at all: a reader polling for the file never sees half of it.
            tmp = f"{args.addrs_file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(f"{addr}\n" for addr in addrs))
            os.replace(tmp, args.addrs_file)
        print("bootstrap DHT is up; peers join with:", flush=True)
        for addr in addrs:
            print(f"  lowcomm join --initial-peers {addr} [recipe options]", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        dht.shutdown()
    return 0


def cmd_bench(argv: list[str]) -> int:
    """Run the benchmark suite, ``python -m scripts.bench.suite`` of the source checkout.

    The suite is not in the wheel: it needs the checkout this package is installed from
    (``pip install -e .``). Without one it says so and returns 2.
    """
    if not (_ROOT / "scripts" / "bench" / "suite.py").is_file():
        print(
            "lowcomm bench: the benchmark suite is not part of the installed package; it runs "
            f"from a source checkout of lowcomm (no scripts/bench/ beside the package, in "
            f"{_ROOT}). Clone the lowcomm git repository, then from its root run `make bench` "
            "(or `pip install -e .` there and `lowcomm bench`).",
            file=sys.stderr,
        )
        return 2
    # The checkout goes on the suite's import path, not its working directory, so that
    # relative paths in argv (--out, --work-dir) still mean the caller's directory. exec, not
    # a child: signals (Ctrl-C, SIGTERM) and the exit status are the suite's own.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "scripts.bench.suite", *argv], env)


COMMANDS = {"train": cmd_train, "join": cmd_join, "dht": cmd_dht, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowcomm`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lowcomm: unknown command {name!r}; one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name](rest)


if __name__ == "__main__":
    sys.exit(main())
