"""DiLoCo under ``torch.amp.GradScaler``: a skipped inner step still counts.

GradScaler skips ``optimizer.step()`` when a rank's gradients hold inf/NaN. DiLoCo's sync
schedule counts inner steps, so a skip on one rank would shift its schedule against the
others', and the next collective would pair different rounds (a hang on NCCL, a reset
connection on gloo). DiLoCo therefore declares ``_step_supports_amp_scaling``: GradScaler
then calls ``step()`` every iteration with ``grad_scale`` and ``found_inf`` set on the
optimizer (the protocol fused optimizers use), and :func:`scaled_inner_step` does what
GradScaler would have done to the inner optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lowcomm.optim.params import local_view

__all__ = ["scaled_inner_step"]


def scaled_inner_step(
    inner: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    closure: Callable[[], float] | None,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> Any:
    """Step ``inner`` as GradScaler would: unscale if needed, skip on inf/NaN gradients.

    Args:
        inner: the inner optimizer.
        params: the parameters whose gradients it steps.
        closure: passed on to ``inner.step``.
        grad_scale: the scale still applied to the gradients (None: already unscaled, or no
            scaler).
        found_inf: nonzero when some gradient is not finite (None: no scaler).

    Returns:
        What ``inner.step`` returned, or None when the step was skipped.
    """
    if found_inf is None:
        return inner.step(closure) if closure is not None else inner.step()
    if getattr(inner, "_step_supports_amp_scaling", False):
        # A fused inner optimizer unscales and skips inside its own kernel.
        scaled: Any = inner
        scaled.grad_scale, scaled.found_inf = grad_scale, found_inf
        try:
            return inner.step(closure) if closure is not None else inner.step()
        finally:
            del scaled.grad_scale, scaled.found_inf
    if grad_scale is not None:
        # The user did not call scaler.unscale_(): the gradients are still scaled.
        _unscale_grads(params, grad_scale)
    # One read back, the one GradScaler itself makes for an optimizer without fused scaling.
    if bool(found_inf.item()):
        return None
    return inner.step(closure) if closure is not None else inner.step()


def _unscale_grads(params: Sequence[torch.Tensor], grad_scale: torch.Tensor) -> None:
    """Divide every gradient by ``grad_scale`` in place (GradScaler's unscale, per device)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = local_view(p.grad)
            by_device.setdefault(g.device, []).append(g)
    for device, grads in by_device.items():
        inv = grad_scale.double().reciprocal().float().to(device)
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
