"""Training metrics: a JSON-lines file, optional Weights & Biases, a rank-0 progress bar.

Example::

    metrics = MetricsLogger(run_dir, enabled=rank == 0, wandb=cfg.wandb, config=cfg.to_dict())
    metrics.log(step, {"train/loss": 2.1, "tokens_per_s": 5e4})
    metrics.close()

Every record is one JSON object per line in ``run_dir/metrics.jsonl`` with a ``step`` and a
wall-clock ``time``; the file is appended to, so a resumed run continues the same log. Only
the process with ``enabled=True`` (rank 0 by convention) writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "Progress", "format_bytes"]

logger = logging.getLogger(__name__)


def format_bytes(num: float) -> str:
    """``1536 -> '1.5KiB'``: a byte count in binary units, at most three significant digits."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    # Switch units at 1000, not 1024, so that no value needs four digits ("1e+03MiB").
    while abs(num) >= 1000 and i < len(units) - 1:
        num /= 1024
        i += 1
    return f"{num:.0f}{units[i]}" if i == 0 else f"{num:.3g}{units[i]}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than invalid
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


class MetricsLogger:
    """Appends metric records to ``metrics.jsonl`` and, optionally, to wandb.

    Call protocol: construct on every rank with ``enabled`` true on one of them; call
    :meth:`log` with monotonically increasing steps; :meth:`close` at the end (idempotent).

    Args:
        run_dir: directory for ``metrics.jsonl`` (created if missing).
        enabled: whether this process writes anything.
        wandb: also log to Weights & Biases. ``WANDB_MODE`` chooses online/offline; offline
            needs no account. Files go under ``run_dir``.
        config: the run's configuration, recorded by wandb.
        project: the wandb project.
        name: the wandb run name (default: ``run_dir``'s name).
        filename: the JSON-lines file name.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool = True,
        wandb: bool = False,
        config: dict[str, Any] | None = None,
        project: str = "lowcomm",
        name: str | None = None,
        filename: str = "metrics.jsonl",
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        self._file = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:  # pragma: no cover - wandb is an optional extra
                raise ValueError(
                    "--wandb needs the wandb package (pip install 'lowcomm[wandb]')"
                ) from e
            self._wandb = wandb_lib.init(
                project=project,
                name=name or Path(run_dir).resolve().name,
                dir=str(Path(run_dir)),
                config=config,
                mode=os.environ.get("WANDB_MODE", "online"),  # type: ignore[arg-type]
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at inner step ``step``."""
        if not self.enabled:
            return
        record = {
            "step": step,
            "time": time.time(),
            **{k: _jsonable(v) for k, v in metrics.items()},
        }
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        """Flush and close the file; finish the wandb run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class Progress:
    """A tqdm progress bar over inner steps, drawn only where ``enabled``.

    Args:
        total: inner steps of the whole run.
        initial: inner steps already done (when resuming).
        enabled: whether to draw (rank 0 and ``--progress``).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps and show ``postfix`` (name -> value) after the bar."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line above the bar (or nowhere when disabled)."""
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        """Remove the bar. Idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
