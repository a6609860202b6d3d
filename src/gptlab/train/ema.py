"""An exponential moving average (EMA) of the model's weights (`train.ema`), for evaluation and the saved model.

After each optimizer step, every trainable parameter's average moves towards it: ema <- d * ema + (1 - d) * w,
with the decay of the k-th update (k = 1, 2, ...) warmed up as TensorFlow's ExponentialMovingAverage does:
d_k = min(train.ema, (1 + k) / (10 + k)) (0.18, 0.5 at k = 8, 0.9 at k = 80, 0.99 at k = 890), so the random
initial weights fade from the average within the first steps instead of dominating it for ~1 / (1 - ema) steps.

The update is `torch._foreach_lerp_` over all parameters at once, the kernel torch.optim.swa_utils'
`get_ema_multi_avg_fn` runs; `AveragedModel` itself is not used, as it deep-copies the module (a second model
for DDP/FSDP/torch.compile to wrap) and starts from a plain copy. The averages are tensors shaped like the
parameters (DTensor shards under FSDP2, updated shard by shard), so every rank keeps the same EMA and
`torch.distributed.checkpoint` stores and reshards them as it does the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own storage of a tensor (a DTensor's local shard, viewed in place), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def ema_decay(decay: float, k: int) -> float:
    """The decay of the k-th update (k = 1, 2, ...): `decay`, warmed up as min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + k) / (10 + k))


class EMA:
    """The moving average of a model's trainable parameters (a LoRA run's: its adapters; the frozen rest never moves).

    `update()` after each optimizer step; `swapped()` puts the averages into the model for evaluation;
    `weights()` is the model's state dict with the averages in place of the raw weights (what model.safetensors
    holds); `state_dict()`/`load_state_dict()` what a resume needs."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.averages = [p.detach().clone() for p in self.params]  # DTensors stay DTensors (FSDP2)
        self.updates = 0  # updates since the average started: the warm-up's k
        self._swapped = False

    def reset(self) -> None:
        """Start the average afresh from the model's current weights (a resume from a checkpoint without one)."""
        with torch.no_grad():
            torch._foreach_copy_([_local(a) for a in self.averages], [_local(p) for p in self.params])
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages towards the weights after an optimizer step (one fused kernel per dtype and device)."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        torch._foreach_lerp_([_local(a) for a in self.averages], [_local(p) for p in self.params], weight)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within it the model's parameters hold the averages (and the averages the raw weights); swapped back after.

        In-place copies, so optimizers, DDP, FSDP2 and compiled graphs keep their tensors; one parameter's worth of
        temporary memory. Re-entrant: a nested use is a no-op."""
        if self._swapped:
            yield
            return
        self._swap()
        self._swapped = True
        try:
            yield
        finally:
            self._swap()
            self._swapped = False

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.averages):
            p, a = _local(p), _local(a)
            tmp = p.clone()
            p.copy_(a)
            a.copy_(tmp)

    def weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (a model's state dict, unsharded) with the averages in place of the trainable parameters."""
        out = dict(state)
        for name, a in zip(self.names, self.averages):
            if name in out:
                out[name] = a.detach()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name, for `torch.distributed.checkpoint` (the update count goes to state.pt)."""
        return dict(zip(self.names, self.averages))

    def load_state_dict(self, averages: dict[str, torch.Tensor], updates: int) -> None:
        """Take a checkpoint's averages (already loaded in place when `averages` came from `state_dict()`)."""
        with torch.no_grad():
            for name, a in zip(self.names, self.averages):
                if averages[name] is not a:
                    a.copy_(averages[name])
        self.updates = updates
