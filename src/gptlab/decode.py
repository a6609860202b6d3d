"""One new token per row through the GPT, without module overhead: the generation engine's hot loop.

A decoding step is small: on a 2-core CPU the 6-layer, 384-dim benchmark model spends ~0.9 ms of a step in
its matmuls and, through `GPT.forward`, ~0.4 ms more in calling modules (`nn.Module.__call__`, attribute
lookups, per-call checks). `Decoder` gathers each block's parameters once and runs the same math as
`model.Block` for (B, 1) tokens as a flat sequence of tensor ops. It holds the model's own Parameter objects,
so it computes with the weights as they are now, except for one copy: q/k/v (and SwiGLU's gate/up) stacked
into one matrix each, which saves two matmul calls a layer (~3% of a step).

Before each step `Decoder.current` checks, cheaply, whether the model may have changed since it gathered
it: the copied tensors' versions (PyTorch bumps `_version` on every in-place change) and pointers, the
model's mode switches (`GPT.mode_switches`: fused AdamW changes weights without bumping versions, inside a
train()/eval() cycle), and any parameter or module registered anywhere (new objects, as
`load_state_dict(assign=True)` or `merge_lora` make). On a change it checks `covers` again and gathers
afresh. Not seen: writes through `.data`, in-place changes that bump no version outside a mode switch, and
forward hooks added after the decoder was made.
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
_registrations = [0]  # parameters and modules registered on any module in this process


def _registered(*_: object) -> None:
    _registrations[0] += 1


module_hooks.register_module_parameter_registration_hook(_registered)
module_hooks.register_module_module_registration_hook(_registered)
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
    norm2: Norm | None  # None: a parallel block, whose MLP reads norm1's output as attention does
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
                "this model needs its own forward (a subclass or changed part, adapters, hooks, or dropout in training)"
            )
        cfg = model.cfg
        self.model = model
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.max_position = cfg.block_size - 1
        self.gqa = cfg.n_kv_head != cfg.n_head
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        self.usable = True
        self._gather()

    def _gather(self) -> None:
        """Take the model's parts as they are now: its parameters, and q/k/v and gate/up stacked afresh."""
        model = self.model
        self.tok_emb = model.tok_emb.weight
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight
        self.rope = None if model.pos_emb is not None else (model.rope_cos, model.rope_sin)
        self.norm_f, self.head = _norm(model.norm_f), model.lm_head.weight
        self.layers = []
        self.sources = []  # what the stacks are copied from
        with torch.no_grad():
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                qkv, gate_up = (attn.q, attn.k, attn.v), (mlp.gate, mlp.up) if self.swiglu else ()
                self.sources += [p for m in qkv + gate_up for p in m.parameters()]
                self.layers.append(
                    _Layer(
                        _norm(block.norm1),
                        _stack(qkv),
                        _norm(attn.q_norm) if attn.qk_norm else None,
                        _norm(attn.k_norm) if attn.qk_norm else None,
                        _linear(attn.out),
                        None if block.parallel else _norm(block.norm2),
                        _stack(gate_up) if self.swiglu else _linear(mlp.fc),
                        _linear(mlp.down),
                    )
                )
        # inference tensors keep no version counter (and cannot be changed in place outside inference mode)
        self.versioned = [p for p in self.sources if not p.is_inference()]
        self.seen = self._fingerprint()

    def _fingerprint(self) -> list[int]:
        """What a change of the model would change (see the module's docstring)."""
        versions = [p._version for p in self.versioned]
        return [_registrations[0], self.model.mode_switches, *versions, *(p.data_ptr() for p in self.sources)]

    def current(self) -> bool:
        """Whether the next step may run through the decoder; gathers the model afresh first if it changed.

        False while the model is not one the decoder covers (e.g. in training mode with dropout), and under autocast.
        """
        if torch.is_autocast_enabled(self.head.device.type):  # the forward casts for it, the decoder does not
            return False
        if self._fingerprint() != self.seen:
            self.usable = self.covers(self.model)
            if self.usable:
                self._gather()
            else:
                self.seen = self._fingerprint()
        return self.usable

    @staticmethod
    def covers(model: nn.Module) -> bool:
        """Whether the decoder computes what this model's forward does: an unmodified GPT, without dropout.

        Every part must be of exactly its type in `model.py` (not a subclass: e.g. LoRA's adapted layers), with
        no forward patched onto it and no hooks (its own or global ones), and with dropout no part may be in
        training mode.
        """
        if type(model) is not GPT or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        for m in model.modules():
            if type(m) not in PARTS or "forward" in m.__dict__ or (m.training and model.cfg.dropout):
                return False
            if m._forward_hooks or m._forward_pre_hooks:
                return False
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) for token ids (B,), each written to its row's next cache slot.

        The caller checks `current()` first and advances `cache.lengths` afterwards, as after `GPT.forward`.
        """
        B, D = ids.shape[0], self.head_dim
        step = CacheStep.of(cache.lengths[:, None], cache)  # the step's one host sync
        positions = cache.lengths
        if step.end > self.max_position + 1:  # as GPT.forward: a spare slot past the context takes the last position
            positions = positions.clamp(max=self.max_position)
        x = self.tok_emb[ids]  # the residual stream (B, C), a new tensor: one token per row, so no time axis
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        if self.rope is not None:  # (B, 1, 1, D) against (B, heads, 1, D)
            cos, sin = self.rope[0][positions][:, None, None], self.rope[1][positions][:, None, None]
        mask = step.mask  # rows at different lengths: made additive once, not converted by each attention call
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        heads = [self.n_head, self.n_kv_head, self.n_kv_head]
        for i, (norm1, qkv, q_norm, k_norm, out, norm2, up, down) in enumerate(self.layers):
            # with one token, (B, heads, 1, D) is attention's layout as it is: no transposes
            h = norm1(x)
            q, k, v = F.linear(h, *qkv).view(B, -1, 1, D).split_with_sizes(heads, dim=1)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if self.rope is not None:
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_all, v_all = cache.store(i, k, v, step)
            if k_all.dtype != q.dtype:  # a cache kept in another precision than the weights
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=self.gqa)
            x += F.linear(y.view(B, -1), *out)  # a parallel block adds the MLP of the same h next: x + attn + mlp
            if norm2 is not None:
                h = norm2(x)
            if self.swiglu:
                gate, h = F.linear(h, *up).chunk(2, dim=-1)
                h = F.silu(gate) * h
            else:
                h = F.gelu(F.linear(h, *up), approximate=self.approximate)
            x += F.linear(h, *down)
        return F.linear(self.norm_f(x), self.head)
