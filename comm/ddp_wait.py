"""How long a DDP training loop is blocked on its gradient all-reduce.

DDP launches one all-reduce per gradient bucket while backward still runs, and backward
returns only when every one of them is done. Once the last bucket is launched there is no
gradient left to compute: what backward does from then on is wait for the wire. So the
blocked time of a step is ``backward's return - the last bucket's launch``, measured with a
communication hook that runs DDP's own all-reduce (``default_hooks.allreduce_hook``: the same
sum and division by the world size) and notes when each bucket starts.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations at run time
# and refuses them as strings.
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lowcomm.comm.timeline import TIMELINE

__all__ = ["DDPWaitClock"]


class DDPWaitClock:
    """Counts the seconds a DDP model's backward waits for its all-reduce, step by step.

    Call protocol: construct once per DDP model, before the first backward (it registers a
    communication hook, and DDP takes only one); call :meth:`backward_done` right after each
    ``loss.backward()`` returns. Each wait is also a ``wait`` span of the timeline
    (:mod:`lowcomm.comm.timeline`).

    Args:
        model: the ``DistributedDataParallel`` module; its all-reduce stays on the group
            it was built with (a replica's own group under ``--replicas``).

    Attributes:
        seconds: blocked seconds so far.
    """

    def __init__(self, model: nn.parallel.DistributedDataParallel) -> None:
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"DDPWaitClock times a DistributedDataParallel model, got {type(model).__name__}"
            )
        self.seconds = 0.0
        self._launched: float | None = None
        # The hook's state is the group it reduces over: DDP's own, never the default group.
        model.register_comm_hook(model.process_group, self._hook)

    def _hook(
        self, group: dist.ProcessGroup | None, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        self._launched = time.perf_counter()
        return default_hooks.allreduce_hook(group, bucket)  # type: ignore[arg-type]

    def backward_done(self) -> float:
        """Count the wait of the backward that just returned; return it in seconds."""
        if self._launched is None:
            return 0.0  # no bucket launched (e.g. under ``no_sync``)
        end = time.perf_counter()
        waited = end - self._launched
        self.seconds += waited
        TIMELINE.add("wait", self._launched, end)
        self._launched = None
        return waited

    def __repr__(self) -> str:
        return f"DDPWaitClock(seconds={self.seconds:.3f})"
