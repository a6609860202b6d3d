"""One new token per row through the GPT, without module overhead: the generation engine's hot loop.

A decoding step is small: on a 2-core CPU the 6-layer, 384-dim benchmark model spends ~0.9 ms of a step in
its matmuls and, through `GPT.forward`, ~0.4 ms more in calling modules (`nn.Module.__call__`, attribute
lookups, per-call checks). `Decoder` gathers each block's parameters once and runs the same math as
`model.Block` for (B, 1) tokens as a flat sequence of tensor ops. It holds the model's own Parameter objects
where it can; copies: q/k/v (and SwiGLU's gate/up) stacked into one matrix each, which saves two matmul calls a
layer (~3% of a step), and on a CPU every fp32 matmul weight reordered for oneDNN (`packs`).

Before each step `Decoder.current` checks, cheaply, whether the model may have changed since it gathered
it: the copied tensors' versions (PyTorch bumps `_version` on every in-place change) and pointers, the
model's mode switches (`GPT.mode_switches`, the train()/eval() calls that changed a mode: fused AdamW changes
weights without bumping versions, inside a train()/eval() cycle), and any parameter or module registered anywhere
(new objects, as `load_state_dict(assign=True)` or `merge_lora` make; when only that moved, the model's own
modules, parameters and buffers are compared by identity, so another model built meanwhile changes nothing). On a
change it checks `covers` again and gathers afresh (with `compile=True`, compiling afresh: `CompiledStep`). Not
seen: writes through `.data`, in-place changes that bump no version outside a mode switch, and forward hooks added
after the decoder was made.
tests/test_decode.py checks its logits and cache writes against `GPT.forward` for every switch of the model.
"""

from __future__ import annotations

import os
import shutil
import threading
import types
import warnings
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config
from torch.nn.modules import module as module_hooks

from gptlab.errors import GptlabError
from gptlab.model import GPT, MLP, Attention, Block, CacheStep, KVCache, rotate_half, softcap
from gptlab.quantize import Int8Linear, int8_linear

Norm = Callable[[torch.Tensor], torch.Tensor]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_registrations = [0]  # parameters and modules registered on any module in this process


def _registered(*_: object) -> None:
    _registrations[0] += 1


module_hooks.register_module_parameter_registration_hook(_registered)
module_hooks.register_module_module_registration_hook(_registered)
Linear = Callable[[torch.Tensor], torch.Tensor]  # what an nn.Linear (or an Int8Linear) computes

# the module types GPT.forward is made of: a model of only these, unmodified, is what the decoder computes
PARTS = (GPT, Block, Attention, MLP, nn.ModuleList, nn.Embedding, nn.Linear, Int8Linear, nn.LayerNorm, nn.RMSNorm)


class _Layer(NamedTuple):
    """One block's parameters, in the order the step uses them."""

    norm1: Norm
    qkv: Linear  # q, k and v stacked (a copy)
    value_embed: torch.Tensor | None  # model.value_embeds: the layer's table, its rows added to the values
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


def packs(weight: torch.Tensor) -> bool:
    """Whether the decoder computes with a copy of this weight in oneDNN's blocked layout: fp32 on a CPU.

    MKL's SGEMM, which `F.linear` runs on a CPU, streams a one-row product's weight at ~8-10 GB/s on a 2-core AMD
    EPYC; oneDNN's inner product over a weight reordered once for it reaches ~20 GB/s, 1.3-3x faster decode steps
    (benchmarks/RESULTS.md). It costs a second copy of the weights while the decoder lives.
    """
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` over a weight `torch.ops.mkldnn._reorder_linear_weight` made."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> Linear:
    """`F.linear` over this weight and bias, through a packed copy of the weight where `pack` (see `packs`)."""
    if pack and packs(weight):
        # reordered for any batch: a batch-size hint of 1 or 8 gave no faster step at either size, 1 a slower one
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        return partial(_packed_linear, weight=packed, bias=None if bias is None else bias.detach())
    return partial(F.linear, weight=weight, bias=bias)


def _linear(layer: nn.Linear | Int8Linear, pack: bool) -> Linear:
    """The function the layer computes, over its own parameters (or a packed copy of its weight)."""
    if isinstance(layer, Int8Linear):
        return partial(int8_linear, weight=layer.weight, scales=layer.scales, bias=layer.bias)
    return _dense(layer.weight, layer.bias, pack)


def _stack(layers: tuple[nn.Linear | Int8Linear, ...], pack: bool) -> Linear:
    """The layers as one: their weights (and int8 scales) as one matrix, their biases as one vector (copies).

    Parameters (without grad), not plain tensors: torch.compile's freezing folds in only parameters as constants.
    """

    def cat(name: str) -> nn.Parameter | None:
        if getattr(layers[0], name, None) is None:
            return None
        return nn.Parameter(torch.cat([getattr(layer, name).detach() for layer in layers]), requires_grad=False)

    if isinstance(layers[0], Int8Linear):
        return partial(int8_linear, weight=cat("weight"), scales=cat("scales"), bias=cat("bias"))
    return _dense(cat("weight"), cat("bias"), pack)


class Decoder:
    """`GPT.forward` for one new token per row with a KV cache, as plain tensor ops.

    A model this does not cover (see `covers`) must be run through its `forward`.
    """

    def __init__(self, model: GPT, compile: bool = False) -> None:
        if not self.covers(model):
            raise ValueError(
                "this model needs its own forward (a subclass or changed part, adapters, hooks, or dropout in training)"
            )
        cfg = model.cfg
        self.model = model
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.max_position = cfg.block_size - 1
        self.gqa = cfg.n_kv_head != cfg.n_head
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        self.logit_softcap = cfg.logit_softcap
        self.usable = True
        self.compile = compile
        self.compiled: CompiledStep | None = None
        self._gather()

    def _gather(self) -> None:
        """Take the model's parts as they are now: its parameters, and q/k/v and gate/up stacked afresh."""
        model = self.model
        self.tok_emb = model.tok_emb.weight
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight
        self.rope = None if model.pos_emb is not None else (model.rope_cos, model.rope_sin)
        # model.x0_lambdas: (resid_lambdas, x0_lambdas), each (n_layer,)
        self.lambdas = (model.resid_lambdas, model.x0_lambdas) if model.cfg.x0_lambdas else None
        pack = not self.compile  # inductor lays out the weights it freezes in for its own kernels
        self.norm_f, self.head = _norm(model.norm_f), _linear(model.lm_head, pack)
        self.dtype = model.tok_emb.weight.dtype
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
                        _stack(qkv, pack),
                        attn.value_embed.weight if attn.value_embeds else None,
                        _norm(attn.q_norm) if attn.qk_norm else None,
                        _norm(attn.k_norm) if attn.qk_norm else None,
                        _linear(attn.out, pack),
                        None if block.parallel else _norm(block.norm2),
                        _stack(gate_up, pack) if self.swiglu else _linear(mlp.fc, pack),
                        _linear(mlp.down, pack),
                    )
                )
        linears = [self.head, *(f for layer in self.layers for f in (layer.qkv, layer.out, layer.up, layer.down))]
        if self.compile or any(f.func is _packed_linear for f in linears):  # weights frozen in or packed: watch all
            self.sources = [*model.parameters(), *model.buffers()]
        # inference tensors keep no version counter (and cannot be changed in place outside inference mode)
        self.versioned = [p for p in self.sources if not p.is_inference()]
        self.seen, self.parts = self._fingerprint(), self._parts()
        # compiled with the weights frozen in: a change to them needs a new compilation
        self.compiled = CompiledStep(self) if self.compile else None

    def _fingerprint(self) -> list[int]:
        """What a change of the model would change (see the module's docstring)."""
        versions = [p._version for p in self.versioned]
        return [_registrations[0], self.model.mode_switches, *versions, *(p.data_ptr() for p in self.sources)]

    def _parts(self) -> list[int]:
        """The model's modules, parameters and buffers, by identity: what a registration in it would change."""
        ids = []
        for m in self.model.modules():
            ids += [id(m), *map(id, m._parameters.values()), *map(id, m._buffers.values())]
        return ids

    def current(self) -> bool:
        """Whether the next step may run through the decoder; gathers the model afresh first if it changed.

        False while the model is not one the decoder covers (e.g. in training mode with dropout), and under autocast.
        """
        if torch.is_autocast_enabled(self.tok_emb.device.type):  # the forward casts for it, the decoder does not
            return False
        now = self._fingerprint()
        if now != self.seen:
            if now[1:] == self.seen[1:] and self._parts() == self.parts:  # registered elsewhere (e.g. another model
                self.seen = now  # built, or compiling's own graph): nothing to gather again, nor to compile
                return self.usable
            self.usable = self.covers(self.model)
            if self.usable:
                self._gather()
            else:
                self.seen, self.parts = self._fingerprint(), self._parts()
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
            stacked = (m.q, m.k, m.v) if type(m) is Attention else (m.gate, m.up) if type(m) is MLP and m.swiglu else ()
            if len({type(part) for part in stacked}) > 1:  # stacked into one matmul: int8 or not alike
                return False
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) for token ids (B,), each written to its row's next cache slot.

        The caller checks `current()` first and advances `cache.lengths` afterwards, as after `GPT.forward`.
        """
        step = CacheStep.of(cache.lengths[:, None], cache)  # the step's one host sync
        if self.compiled is not None:
            return self.compiled(ids, cache, step)
        positions = cache.lengths
        if step.end > self.max_position + 1:  # as GPT.forward: a spare slot past the context takes the last position
            positions = positions.clamp(max=self.max_position)
        mask = step.mask  # rows at different lengths: made additive once, not converted by each attention call
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=ids.device).masked_fill_(~mask, float("-inf"))

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_all, v_all = cache.store(i, k, v, step)
            if k_all.dtype != q.dtype:  # a cache kept in another precision than the weights
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=self.gqa)

        return self.run(ids, positions, attend)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The step's math with attention left to `attend(layer, q, k, v)` -> (B, heads, 1, head_dim)."""
        B, D = ids.shape[0], self.head_dim
        x = self.tok_emb[ids]  # the residual stream (B, C), a new tensor: one token per row, so no time axis
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        if self.rope is not None:  # (B, 1, 1, D) against (B, heads, 1, D)
            cos, sin = self.rope[0][positions][:, None, None], self.rope[1][positions][:, None, None]
        heads = [self.n_head, self.n_kv_head, self.n_kv_head]
        x0 = x
        for i, (norm1, qkv, value_embed, q_norm, k_norm, out, norm2, up, down) in enumerate(self.layers):
            if self.lambdas is not None:  # a new tensor: x0 is never written in place
                x = self.lambdas[0][i] * x + self.lambdas[1][i] * x0
            # with one token, (B, heads, 1, D) is attention's layout as it is: no transposes
            h = norm1(x)
            q, k, v = qkv(h).view(B, -1, 1, D).split_with_sizes(heads, dim=1)
            if value_embed is not None:
                v = v + value_embed[ids].view(B, -1, 1, D)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if self.rope is not None:
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            y = attend(i, q, k, v)
            x += out(y.reshape(B, -1))  # a parallel block adds the MLP of the same h next: x + attn + mlp
            if norm2 is not None:
                h = norm2(x)
            if self.swiglu:
                gate, h = up(h).chunk(2, dim=-1)
                h = F.silu(gate) * h
            elif self.relu2:
                h = F.relu(up(h)).square()
            else:
                h = F.gelu(up(h), approximate=self.approximate)
            x += down(h)
        return softcap(self.head(self.norm_f(x)), self.logit_softcap)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile builds CPU kernels with ($CXX, else g++), if it is on the PATH."""
    return shutil.which(os.environ.get("CXX", "g++"))


def check_compile(device: torch.device | str) -> None:
    """A user error where `--compile` cannot work: torch.compile on a CPU builds C++ with the compiler in $CXX."""
    if torch.device(device).type == "cpu" and cpp_compiler() is None:
        raise GptlabError(
            f"--compile needs a C++ compiler on a CPU ({os.environ.get('CXX', 'g++')} is not on the PATH)",
            "install g++ (e.g. apt-get install g++) or set CXX, or leave out --compile",
        )


# inductor's settings while a compiled step runs (and compiles): the weights frozen in, no autotuning tables printed,
# and no graph from the disk cache: its key leaves out the values of frozen int8 weights, so a later process compiling
# another model of the same shapes got the first one's weights back (logits 0.76 off, measured)
INDUCTOR = {
    "freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
    "fx_graph_cache": False,
}  # fmt: skip
# the settings are the process's: one step at a time sets them (another thread's step would restore them under it,
# and freezing left on would freeze the weights of any other no-grad compilation, e.g. a compiled model's evaluation)
_inductor_settings = threading.Lock()


def _inputs_only(guards: list) -> list[bool]:
    """Which of dynamo's guards a compiled step keeps: those on its inputs, not on its own attributes."""
    return [not guard.name.startswith("L['self']") for guard in guards]


class CompiledStep:
    """The decoder's step through torch.compile: inductor fuses the small ops around the matmuls and generates
    the matmuls' kernels, with the weights frozen in as constants (laid out for them once).

    On a 2-core AVX-512 CPU this brings the 6-layer, 384-dim model's matmuls from ~10 GB/s through MKL to the
    memory's ~30 GB/s (benchmarks/generate_speed.py). The graph must not write into the KV cache (functionalized,
    a write into a graph input copies the whole cache), so attention reads the cache's filled slots as they are and
    the row's new key and value beside them, and the step writes the new keys and values of every layer into the
    cache afterwards, in one copy. The batch and the cache length are dynamic: one compilation for batch 1 and
    one for larger batches, whatever the lengths.
    """

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        # inductor's autotuning reads a tensor's storage the deprecated way: torch's warning, not the user's to act on
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        self.kv_group = decoder.n_head // decoder.n_kv_head
        self.scale = decoder.head_dim**-0.5  # scaled_dot_product_attention's default, as GPT.forward uses
        # torch.compile keeps its compilations per code object, at most 8 (`recompile_limit`) whatever instance they
        # belong to: this step's own copy of `_body` keeps other models' steps from taking its places
        body = CompiledStep._body
        own = types.FunctionType(body.__code__.replace(), body.__globals__, body.__name__, body.__defaults__)
        # autotuned GEMMs on a CPU (seconds); on a GPU, max_autotune's Triton search would take minutes. No guards on
        # this step's own attributes (the frozen weights' identities, ~60 checks a call: ~9% of a small model's
        # step): a change to them makes a new CompiledStep with a code object of its own; the inputs stay guarded
        options = {"max_autotune": decoder.tok_emb.device.type == "cpu", "guard_filter_fn": _inputs_only}
        self.body = torch.compile(types.MethodType(own, self), fullgraph=True, options=options)

    def _body(
        self, ids: torch.Tensor, positions: torch.Tensor, k_prev: torch.Tensor, v_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, and every layer's new keys and values (layers, B, kv_heads, 1, head_dim), for the graph."""
        new_k, new_v = [], []
        B, H, D = ids.shape[0], self.decoder.n_kv_head, self.decoder.head_dim
        # each row sees the slots before its own (its own slot holds an old key until the step writes the new one)
        earlier = torch.arange(k_prev.shape[3], device=ids.device) < positions[:, None, None, None]
        bias = torch.zeros(earlier.shape, device=ids.device).masked_fill(~earlier, float("-inf"))

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            new_k.append(k)
            new_v.append(v)
            # in fp32 whatever the weights' dtype, as scaled_dot_product_attention computes half precision on a CPU
            dtype, q = q.dtype, q.float().reshape(B, H, self.kv_group, D)  # a kv head's query heads side by side
            earlier = q @ k_prev[i].float().transpose(-1, -2) * self.scale + bias  # (B, H, group, slots)
            own = (q * k.float()).sum(-1, keepdim=True) * self.scale  # the token's own key
            p = torch.cat([earlier, own], dim=-1).softmax(dim=-1)
            return (p[..., :-1] @ v_prev[i].float() + p[..., -1:] * v.float()).to(dtype)

        logits = self.decoder.run(ids, positions.clamp(max=self.decoder.max_position), attend)
        return logits, torch.stack(new_k), torch.stack(new_v)

    def __call__(self, ids: torch.Tensor, cache: KVCache, step: CacheStep) -> torch.Tensor:
        """The step's logits; writes its new keys and values into the cache."""
        k_prev, v_prev = cache.k.narrow(3, 0, step.end), cache.v.narrow(3, 0, step.end)
        for t, dims in ((ids, (0,)), (cache.lengths, (0,)), (k_prev, (1, 3)), (v_prev, (1, 3))):
            for dim in dims:  # no recompilation as the cache fills, nor for each batch size above 1
                torch._dynamo.maybe_mark_dynamic(t, dim)
        with _inductor_settings:  # for this graph only (compile's `options` do not reach freezing)
            before = {name: getattr(inductor_config, name) for name in INDUCTOR}
            for name, value in INDUCTOR.items():
                setattr(inductor_config, name, value)
            try:
                logits, new_k, new_v = self.body(ids, cache.lengths, k_prev, v_prev)
            finally:
                for name, value in before.items():
                    setattr(inductor_config, name, value)
        cache.store_layers(new_k, new_v, step)
        return logits
