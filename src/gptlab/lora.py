"""LoRA: low-rank adapters on a frozen model's linear layers (Hu et al., 2021).

Each adapted `nn.Linear` keeps its frozen weight W and gains A (rank x in) and B (out x rank), computing
x W^T + (alpha / rank) * dropout(x) A^T B^T. B starts at zero, so training starts from the base model exactly.
The adapters keep the layer's parameter names (`q.weight`, `q.bias`) and add `q.lora_a`, `q.lora_b`, so a base
checkpoint still loads by name; `merge_lora` folds them into plain weights for sampling, serving and export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# the projections that get adapters: attention's q, k, v, out and every MLP matrix (fc, gate, up, down)
TARGETS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.gate", "mlp.up", "mlp.down")
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoRALinear(nn.Linear):
    """A linear layer with a frozen weight (and bias) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: nothing is copied
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code
        self.scale = alpha / rank
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(update, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` holding W + scale * B A."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain = plain.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> int:
    """Freeze every parameter of `model` and put adapters on its attention and MLP projections; returns their count."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if name.endswith(TARGETS) and type(m) is nn.Linear]
    for name, module in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by a plain linear layer with the update folded in; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, child = _parent(model, name)
            setattr(parent, child, module.merged().train(module.training))
    return model


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter tensor (what a LoRA checkpoint holds)."""
    return name.endswith(ADAPTER_SUFFIXES)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return model.get_submodule(path), child
