"""Muon whose Newton-Schulz orthogonalisation runs in the fastest precision the device has.

`torch.optim.Muon` always orthogonalises in bf16. CPUs without bf16 dot-product instructions (AVX2 without
AVX512_BF16 or AMX: most laptops, AMD before Zen 4) emulate bf16 matmuls, and there the iteration made the
default recipe's step 12.8x AdamW's (benchmarks/RESULTS.md); in fp32 it costs what the FLOPs say. This class
keeps torch's algorithm, hyper-parameters and state layout (`momentum_buffer`, so checkpoints move between the
two) and changes two things: the precision (`ns_dtype`), and matrices of one shape orthogonalised together as a
batch (one batched matmul instead of one per layer: fewer, larger ops, which pays at small widths on CPUs).
With `ns_dtype=torch.bfloat16` it gives torch's updates up to the rounding of batched matmuls.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run on native instructions, so bf16 is faster than fp32, not emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    # oneDNN's bf16 path needs AVX-512 (x86) or the bf16 extension (Arm); honours ONEDNN_MAX_CPU_ISA
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except AttributeError:  # a torch without the query: trust oneDNN's answer
        return True
    if caps.get("architecture") != "x86_64":
        return True
    # plain AVX-512 converts bf16 to fp32 and back around fp32 FMAs: slower than fp32 itself
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def muon_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The orthogonalisation's dtype for train.muon_precision ("auto": bf16 where native, else fp32)."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def orthogonalise(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Newton-Schulz's quintic iteration on a batch of matrices (B, rows, cols) with rows <= cols."""
    a, b, c = coefficients
    x = updates / updates.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):  # torch's addmm chain, batched: x <- a x + (b G + c G^2) x with G = x x^T
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with the orthogonalisation in `ns_dtype` and batched over matrices of one shape."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype  # a property of the device, not of the run: not in the state dict

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on every parameter with a gradient (the algorithm of torch.optim.Muon)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r} is not supported by gptlab's Muon")
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[tuple(p.shape)].append(i)
            lr, momentum = group["lr"], group["momentum"]
            for (rows, cols), members in by_shape.items():
                updates = []
                for i in members:
                    bufs[i].lerp_(grads[i], 1 - momentum)
                    updates.append(grads[i].lerp(bufs[i], momentum) if group["nesterov"] else bufs[i])
                stacked = torch.stack(updates).to(self.ns_dtype)
                if rows > cols:  # iterate on the wide side: the Gram matrix is the smaller one
                    stacked = stacked.mT
                ortho = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if rows > cols:
                    ortho = ortho.mT
                scale = lr * math.sqrt(max(1.0, rows / cols))  # torch's "original" shape adjustment
                for i, o in zip(members, ortho.unbind()):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(o, alpha=-scale)
        return loss
