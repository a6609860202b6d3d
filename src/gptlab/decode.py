"""One new token per row through the GPT, without module overhead: the generation engine's hot loop.

A decoding step is small: on a 2-core CPU the 6-layer, 384-dim benchmark model spends ~0.9 ms of a step in
its matmuls and, through `GPT.forward`, ~0.4 ms more in calling modules (`nn.Module.__call__`, attribute
lookups, per-call checks). `Decoder` takes each block's tensors once and runs the same math as
`model.Block` for (B, 1) tokens as a flat sequence of tensor ops, with q/k/v (and SwiGLU's gate/up) stacked
into one matmul each. tests/test_decode.py checks its logits against `GPT.forward` for every
switch of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.model import GPT, CacheStep, KVCache, rotate_half

Norm = Callable[[torch.Tensor], torch.Tensor]


class _Layer(NamedTuple):
    """One block's tensors, in the order the step uses them."""

    norm1: Norm
    qkv: tuple[torch.Tensor, torch.Tensor | None]  # q, k and v stacked: weight and bias
    q_norm: Norm | None
    k_norm: Norm | None
    out: tuple[torch.Tensor, torch.Tensor | None]  # the nn.Linear's own weight and bias
    norm2: Norm
    up: tuple[torch.Tensor, torch.Tensor | None]  # gate and up stacked for SwiGLU, else fc's own
    down: tuple[torch.Tensor, torch.Tensor | None]


def _norm(module: nn.Module) -> Norm:
    """The function an nn.LayerNorm or nn.RMSNorm computes, over its own parameters.

    A partial of the ATen op itself: `F.layer_norm`'s Python wrapper costs ~0.5 us a call, 13 calls a step.
    """
    if isinstance(module, nn.RMSNorm):
        return partial(torch.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)
    return partial(
        torch.layer_norm,
        normalized_shape=module.normalized_shape,
        weight=module.weight,
        bias=module.bias,
        eps=module.eps,
    )


def _stack(layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' weights as one (out, in) matrix, as nn.Linear keeps one, and their biases as one vector (copies)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    bias = torch.cat([layer.bias.detach() for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


def _plain(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


class Decoder:
    """`GPT.forward` for one new token per row with a KV cache, as plain tensor ops.

    The stacked matrices are copies taken at construction: build a new Decoder after the weights change.
    A model this does not cover (see `covers`) must be run through its `forward`.
    """

    def __init__(self, model: GPT) -> None:
        if not self.covers(model):
            raise ValueError("this model needs its own forward (a GPT subclass, adapted layers or hooks)")
        cfg = model.cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.gqa = cfg.n_kv_head != cfg.n_head
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        self.tok_emb = model.tok_emb.weight.detach()
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight.detach()
        self.rope = None if model.pos_emb is not None else (model.rope_cos, model.rope_sin)
        self.norm_f, self.head = _norm(model.norm_f), model.lm_head.weight.detach()
        self.layers = []
        with torch.no_grad():
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                self.layers.append(
                    _Layer(
                        _norm(block.norm1),
                        _stack((attn.q, attn.k, attn.v)),
                        _norm(attn.q_norm) if attn.qk_norm else None,
                        _norm(attn.k_norm) if attn.qk_norm else None,
                        _plain(attn.out),
                        _norm(block.norm2),
                        _stack((mlp.gate, mlp.up)) if self.swiglu else _plain(mlp.fc),
                        _plain(mlp.down),
                    )
                )

    @staticmethod
    def covers(model: nn.Module) -> bool:
        """Whether the decoder computes what this model's forward does: a plain GPT, no adapters, no hooks."""
        if type(model).forward is not GPT.forward or model.training:
            return False
        for m in model.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return False
            if isinstance(m, nn.Linear) and type(m) is not nn.Linear:  # e.g. LoRA's adapted layers
                return False
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) for token ids (B,), each written to its row's next cache slot.

        The caller advances `cache.lengths` afterwards, as after `GPT.forward`.
        """
        B, D, positions = ids.shape[0], self.head_dim, cache.lengths
        step = CacheStep.of(positions[:, None], cache)  # the step's one host sync
        x = self.tok_emb[ids]  # the residual stream (B, C), a new tensor: one token per row, so no time axis
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        if self.rope is not None:  # (B, 1, 1, D) against (B, heads, 1, D)
            cos, sin = self.rope[0][positions][:, None, None], self.rope[1][positions][:, None, None]
        heads = [self.n_head, self.n_kv_head, self.n_kv_head]
        for i, (norm1, qkv, q_norm, k_norm, out, norm2, up, down) in enumerate(self.layers):
            # with one token, (B, heads, 1, D) is attention's layout as it is: no transposes
            q, k, v = F.linear(norm1(x), *qkv).view(B, -1, 1, D).split_with_sizes(heads, dim=1)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if self.rope is not None:
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_all, v_all = cache.store(i, k, v, step)
            if k_all.dtype != q.dtype:  # a cache kept in another precision than the weights
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=step.mask, enable_gqa=self.gqa)
            x += F.linear(y.view(B, -1), *out)
            h = norm2(x)
            if self.swiglu:
                gate, h = F.linear(h, *up).chunk(2, dim=-1)
                h = F.silu(gate) * h
            else:
                h = F.gelu(F.linear(h, *up), approximate=self.approximate)
            x += F.linear(h, *down)
        return F.linear(self.norm_f(x), self.head)
