"""Optimizers: AdamW with decay on the parameter kinds train.decay_groups names, or Muon for hidden matrices."""

from __future__ import annotations

import torch
from torch import nn

from gptlab.config import TrainConfig, decay_kinds
from gptlab.lora import is_adapter
from gptlab.train.muon import Muon, muon_dtype


def _adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # the fused kernel is one launch for all parameters; available on CUDA and CPU
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


EMBEDDINGS = ("tok_emb.weight", "pos_emb.weight")  # and each block's attn.value_embed.weight (model.value_embeds)


def param_kind(name: str, ndim: int) -> str | None:
    """The train.decay_groups kind of a parameter by its PyTorch name and number of axes (None: no kind, never
    decayed: LoRA adapters, whose decay would pull a fine-tune back towards its base as the LoRA paper's does not)."""
    if is_adapter(name):
        return None
    if any("norm" in part for part in name.split(".")[:-1]):  # norm1, norm_f, q_norm: gains and shifts
        return "norms"
    if name.endswith(".bias"):
        return "biases"
    if name in EMBEDDINGS or name.endswith(".value_embed.weight"):
        return "embeddings"
    if name.startswith("lm_head."):
        return "head"
    return "matrices" if ndim >= 2 else None  # 1-D: model.x0_lambdas' resid_lambdas and x0_lambdas, never decayed


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`; each param group remembers its peak lr in `peak_lr`."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # weight decay on the kinds train.decay_groups names (by default every matrix: linear weights, embeddings and
    # an untied head; never norms, biases and LoRA adapters)
    kinds = decay_kinds(cfg.decay_groups)
    decay = [p for n, p in params if param_kind(n, p.dim()) in kinds]
    no_decay = [p for n, p in params if param_kind(n, p.dim()) not in kinds]
    if cfg.optimizer == "muon":
        # Muon orthogonalises updates of 2-D hidden matrices; embeddings (value embeddings under blocks. too), the
        # head and rank-r adapters (of no kind) stay on AdamW
        hidden = [p for n, p in params if n.startswith("blocks.") and param_kind(n, p.dim()) == "matrices"]
        hidden_ids = {id(p) for p in hidden}
        decay = [p for p in decay if id(p) not in hidden_ids]
        no_decay = [p for p in no_decay if id(p) not in hidden_ids]  # there when matrices are not decayed
        optimizers: list[torch.optim.Optimizer] = []
        if hidden:  # none when LoRA freezes them all
            wd = cfg.weight_decay if "matrices" in kinds else 0.0  # the hidden matrices are all of that kind
            muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=wd, ns_dtype=muon_dtype(cfg.muon_precision, device))
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
