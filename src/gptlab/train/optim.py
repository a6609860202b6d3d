"""Optimizers: AdamW with decay on matmul/embedding weights only, or Muon for hidden matrices."""

from __future__ import annotations

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.lora import is_adapter


def _adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # the fused kernel is one launch for all parameters; available on CUDA and CPU
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`; each param group remembers its peak lr in `peak_lr`."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # weight decay on matrices (matmuls and embeddings) only; never on norms, biases and LoRA adapters (decaying
    # them would pull the fine-tune back towards the base, as the LoRA paper's setup does not)
    decay = [p for n, p in params if p.dim() >= 2 and not is_adapter(n)]
    no_decay = [p for n, p in params if p.dim() < 2 or is_adapter(n)]
    if cfg.optimizer == "muon":
        # Muon orthogonalises updates of 2-D hidden matrices; embeddings, the head and rank-r adapters stay on AdamW
        hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.") and not is_adapter(n)]
        hidden_ids = {id(p) for p in hidden}
        decay = [p for p in decay if id(p) not in hidden_ids]
        optimizers: list[torch.optim.Optimizer] = []
        if hidden:  # none when LoRA freezes them all
            muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
            for g in muon.param_groups:
                g["peak_lr"] = cfg.muon_lr
            optimizers.append(muon)
    else:
        optimizers = []
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "peak_lr": cfg.lr},
    ]
    optimizers.append(_adamw([g for g in groups if g["params"]], cfg, device))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Scale every group's peak lr by the schedule's factor."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
