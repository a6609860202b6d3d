"""One new token per row through the GPT, without module overhead: the generation engine's hot loop.

A decoding step is small: on a 2-core CPU the 6-layer, 384-dim benchmark model spends ~0.9 ms of a step in
its matmuls and, through `GPT.forward`, ~0.4 ms more in calling modules (`nn.Module.__call__`, attribute
lookups, per-call checks). `Decoder` gathers each block's parameters once and runs the same math as
`model.Block` for (B, 1) tokens as a flat sequence of tensor ops. It holds the model's own Parameter objects,
so it computes with the weights as they are now, except for one copy: q/k/v (and SwiGLU's gate/up) stacked
into one matrix each, which saves two matmul calls a layer (~3% of a step). Before each step it checks that
the copied weights are the same tensors at the same version (PyTorch bumps `_version` on every in-place
change) and that the model has not entered training mode since, and stacks them again if not.
tests/test_decode.py checks its logits and cache writes against `GPT.forward` for every switch of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from gptlab.model import GPT, MLP, Attention, Block, CacheStep, KVCache, rotate_half

Norm = Callable[[torch.Tensor], torch.Tensor]
Linear = tuple[nn.Parameter, nn.Parameter | None]  # an nn.Linear's weight and bias

# the module types GPT.forward is made of: a model of only these, unmodified, is what the decoder computes
PARTS = (GPT, Block, Attention, MLP, nn.ModuleList, nn.Embedding, nn.Linear, nn.LayerNorm, nn.RMSNorm)


class _Layer(NamedTuple):
    """One block's parameters, in the order the step uses them."""

    norm1: Norm
    qkv: Linear  # q, k and v stacked (a copy)
    q_norm: Norm | None
    k_norm: Norm | None
    out: Linear
    norm2: Norm
    up: Linear  # SwiGLU's gate and up stacked (a copy), or the GELU MLP's fc
    down: Linear


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


def _linear(layer: nn.Linear) -> Linear:
    return layer.weight, layer.bias


def _stack(layers: tuple[nn.Linear, ...]) -> Linear:
    """The layers' weights as one matrix, and their biases as one vector (copies)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    return weight, torch.cat([layer.bias.detach() for layer in layers]) if layers[0].bias is not None else None


class Decoder:
    """`GPT.forward` for one new token per row with a KV cache, as plain tensor ops.

    A model this does not cover (see `covers`) must be run through its `forward`.
    """

    def __init__(self, model: GPT) -> None:
        if not self.covers(model):
            raise ValueError(
                "this model needs its own forward (a GPT subclass or changed part, adapters, hooks or training mode)"
            )
        cfg = model.cfg
        self.model = model  # its rotary tables are read at each step: `model.to` replaces buffers, not parameters
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.max_position = cfg.block_size - 1
        self.gqa = cfg.n_kv_head != cfg.n_head
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        self.tok_emb = model.tok_emb.weight
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight
        self.norm_f, self.head = _norm(model.norm_f), model.lm_head.weight
        self.stacked = [
            ((b.attn.q, b.attn.k, b.attn.v), (b.mlp.gate, b.mlp.up) if self.swiglu else None) for b in model.blocks
        ]
        self.sources = [
            p for groups in self.stacked for group in groups if group for m in group for p in m.parameters()
        ]
        self._stack()

    def _stack(self) -> None:
        """Gather the layers, stacking q/k/v and gate/up afresh; remember what the stacks were copied from."""
        self.layers = []
        with torch.no_grad():
            for block, (qkv, gate_up) in zip(self.model.blocks, self.stacked, strict=True):
                attn, mlp = block.attn, block.mlp
                self.layers.append(
                    _Layer(
                        _norm(block.norm1),
                        _stack(qkv),
                        _norm(attn.q_norm) if attn.qk_norm else None,
                        _norm(attn.k_norm) if attn.qk_norm else None,
                        _linear(attn.out),
                        _norm(block.norm2),
                        _stack(gate_up) if gate_up else _linear(mlp.fc),
                        _linear(mlp.down),
                    )
                )
        self.copied = self._fingerprint()

    def _fingerprint(self) -> list[int]:
        """What the stacks depend on: each source tensor and its version, and how often training mode was entered."""
        sources = self.sources
        return [self.model.train_calls] + [p._version for p in sources] + [p.data_ptr() for p in sources]

    @staticmethod
    def covers(model: nn.Module) -> bool:
        """Whether the decoder computes what this model's forward does: an unmodified GPT in eval mode.

        Every part must be of exactly its type in `model.py` (not a subclass: e.g. LoRA's adapted layers), with
        no forward patched onto it, no hooks (its own or global ones) and not in training mode.
        """
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        for m in model.modules():
            if type(m) not in PARTS or "forward" in m.__dict__ or m.training:
                return False
            if m._forward_hooks or m._forward_pre_hooks:
                return False
        return type(model) is GPT

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) for token ids (B,), each written to its row's next cache slot.

        The caller advances `cache.lengths` afterwards, as after `GPT.forward`.
        """
        if self._fingerprint() != self.copied:  # the weights changed since the stacks were made
            self._stack()
        B, D = ids.shape[0], self.head_dim
        step = CacheStep.of(cache.lengths[:, None], cache)  # the step's one host sync
        positions = cache.lengths
        if step.end > self.max_position + 1:  # as GPT.forward: a spare slot past the context takes the last position
            positions = positions.clamp(max=self.max_position)
        x = self.tok_emb[ids]  # the residual stream (B, C), a new tensor: one token per row, so no time axis
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        rope = self.pos_emb is None
        if rope:  # (B, 1, 1, D) against (B, heads, 1, D)
            cos, sin = self.model.rope_cos[positions][:, None, None], self.model.rope_sin[positions][:, None, None]
        mask = step.mask  # rows at different lengths: made additive once, not converted by each attention call
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        heads = [self.n_head, self.n_kv_head, self.n_kv_head]
        for i, (norm1, qkv, q_norm, k_norm, out, norm2, up, down) in enumerate(self.layers):
            # with one token, (B, heads, 1, D) is attention's layout as it is: no transposes
            q, k, v = F.linear(norm1(x), *qkv).view(B, -1, 1, D).split_with_sizes(heads, dim=1)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if rope:
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_all, v_all = cache.store(i, k, v, step)
            if k_all.dtype != q.dtype:  # a cache kept in another precision than the weights
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=self.gqa)
            x += F.linear(y.view(B, -1), *out)
            h = norm2(x)
            if self.swiglu:
                gate, h = F.linear(h, *up).chunk(2, dim=-1)
                h = F.silu(gate) * h
            else:
                h = F.gelu(F.linear(h, *up), approximate=self.approximate)
            x += F.linear(h, *down)
        return F.linear(self.norm_f(x), self.head)
