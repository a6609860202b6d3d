"""The GPT of `gptlab.model` as plain JAX functions of a parameter tree, with the same blocks and switches.

Parameters are a dict keyed by the PyTorch names. The blocks' entries are stacked along a leading layer axis under
"blocks", so one `lax.scan` runs every block and compile time does not grow with depth; their linear weights are
stored (in, out), the layout `x @ w` wants. `from_torch` and `to_torch` convert exactly, so a run directory loads
into either framework and a JAX-trained model is sampled, served and exported by the PyTorch tools unchanged.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gptlab.config import Config, ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT, rope_tables

Params = dict[str, Any]  # {"tok_emb.weight": (V, C), ..., "blocks": {"attn.q.weight": (L, C, H*D), ...}}
Cache = tuple[jax.Array, jax.Array]  # keys and values, each (n_layer, B, slots, n_kv_head, head_dim)


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter of a model of `cfg` (resolved), in this module's layout."""
    C, L, F, V = cfg.n_embd, cfg.n_layer, cfg.d_ff, cfg.vocab_size
    q_out, kv_out = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    linears = {"attn.q": (C, q_out), "attn.k": (C, kv_out), "attn.v": (C, kv_out), "attn.out": (C, C)}
    if cfg.mlp == "swiglu":
        linears |= {"mlp.gate": (C, F), "mlp.up": (C, F), "mlp.down": (F, C)}
    else:
        linears |= {"mlp.fc": (C, F), "mlp.down": (F, C)}
    block: dict[str, tuple[int, ...]] = {}
    for name in ("norm1",) if cfg.parallel_block else ("norm1", "norm2"):  # a parallel block shares one norm
        block[f"{name}.weight"] = (L, C)
        if cfg.bias and cfg.norm == "layernorm":
            block[f"{name}.bias"] = (L, C)
    for name, (n_in, n_out) in linears.items():
        block[f"{name}.weight"] = (L, n_in, n_out)
        if cfg.bias:
            block[f"{name}.bias"] = (L, n_out)
    if cfg.qk_norm:
        block |= {"attn.q_norm.weight": (L, cfg.head_dim), "attn.k_norm.weight": (L, cfg.head_dim)}
    if cfg.value_embeds:  # a table (V, kv_out) per layer, as PyTorch's: rows, not a linear's (in, out)
        block["attn.value_embed.weight"] = (L, V, kv_out)
    shapes: Params = {"tok_emb.weight": (V, C), "blocks": block, "norm_f.weight": (C,)}
    if cfg.x0_lambdas:
        shapes |= {"resid_lambdas": (L,), "x0_lambdas": (L,)}
    if cfg.position == "learned":
        shapes["pos_emb.weight"] = (cfg.block_size, C)
    if cfg.bias and cfg.norm == "layernorm":
        shapes["norm_f.bias"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
    """Fresh parameters with `GPT.reset_parameters`' init: N(0, 0.02), residual projections scaled by 1/sqrt(2L),
    value embeddings and x0_lambdas zero, resid_lambdas one."""
    cfg = cfg.resolved()
    shapes = param_shapes(cfg)
    flat, tree = jax.tree.flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.endswith(("attn.out.weight", "mlp.down.weight")):
            if cfg.zero_init_out:
                leaves.append(jnp.zeros(shape))
            else:
                leaves.append(jax.random.normal(k, shape) * (0.02 / math.sqrt(2 * cfg.n_layer)))
        elif name.endswith("bias") or name in ("attn.value_embed.weight", "x0_lambdas"):
            leaves.append(jnp.zeros(shape))
        elif "norm" in name or name == "resid_lambdas":
            leaves.append(jnp.ones(shape))
        else:
            leaves.append(jax.random.normal(k, shape) * 0.02)
    return jax.tree.unflatten(tree, leaves)


def jax_device(name: str) -> jax.Device:
    """The JAX device for a device name (train.device, --device): auto (JAX's default, a GPU when its CUDA build is
    installed), cpu, cuda or cuda:N."""
    if name == "auto":
        return jax.devices()[0]
    if name == "cpu":
        return jax.devices("cpu")[0]
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda:
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        index = int(cuda[1] or 0)
        if index >= len(gpus):
            raise GptlabError(
                f"device '{name}' was asked for but JAX sees {len(gpus)} GPUs",
                'install JAX with CUDA (pip install "jax[cuda12]"), or use the cpu device',
            )
        return gpus[index]
    raise GptlabError(f"device '{name}' is not supported by the JAX backend", "use auto, cpu, cuda or cuda:N")


def jax_dtype(name: str, device: jax.Device) -> Any:
    """The compute dtype for a dtype name (train.dtype, --dtype): auto is bf16 on a GPU and fp32 elsewhere, as for
    PyTorch; float16 would need loss scaling, which the JAX backend does not have."""
    if name == "auto":
        return jnp.bfloat16 if device.platform == "gpu" else jnp.float32
    if name == "float16":
        raise GptlabError("float16 is not supported by the JAX backend", "use bfloat16 or float32")
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# ----- the forward pass -------------------------------------------------------------------------------------------
def _linear(p: Params, name: str, x: jax.Array) -> jax.Array:
    """x @ w + b in x's dtype (the compute dtype: the weights are cast to it, as autocast casts them)."""
    y = x @ p[f"{name}.weight"].astype(x.dtype)
    bias = p.get(f"{name}.bias")
    return y + bias.astype(x.dtype) if bias is not None else y


def _norm(cfg: ModelConfig, weight: jax.Array, bias: jax.Array | None, x: jax.Array, rms: bool = False) -> jax.Array:
    """RMSNorm (`rms` or model.norm=rmsnorm) or LayerNorm over the last axis, computed in fp32."""
    xf = x.astype(jnp.float32)
    if rms or cfg.norm == "rmsnorm":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
    else:
        mean = xf.mean(axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + cfg.norm_eps)
    y = y.astype(x.dtype) * weight
    return y + bias if bias is not None else y


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _attention(
    cfg: ModelConfig,
    p: Params,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None,
    visible: jax.Array,
    cache: Cache | None,
    layer: jax.Array,
    slots: jax.Array | None,
    keys: jax.Array | None,
    idx: jax.Array,
) -> tuple[jax.Array, Cache | None]:
    """Causal self-attention; with a `cache`, the new keys and values are written into `slots` (B, T) of its
    `layer` first (in place: the cache is carried through the layers, never copied) and the queries read every
    slot `visible` (B or 1, T, S) shows them. `idx` (B, T): the tokens, whose value embeddings are added to v."""
    B, T, C = x.shape
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = _linear(p, "attn.q", x).reshape(B, T, H, D)
    k = _linear(p, "attn.k", x).reshape(B, T, KV, D)
    v = _linear(p, "attn.v", x).reshape(B, T, KV, D)
    if cfg.value_embeds:
        v = v + p["attn.value_embed.weight"][idx].astype(v.dtype).reshape(B, T, KV, D)
    if cfg.qk_norm:
        q = _norm(cfg, p["attn.q_norm.weight"], None, q, rms=True)  # RMSNorm whatever model.norm is, as GPT's
        k = _norm(cfg, p["attn.k_norm.weight"], None, k, rms=True)
    if rope is not None:
        cos, sin = rope  # (B or 1, T, 1, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    if cache is not None:
        rows = jnp.arange(B)[:, None]
        cache = tuple(c.at[layer, rows, slots].set(new.astype(c.dtype)) for c, new in zip(cache, (k, v)))
        k, v = cache[0][layer].astype(q.dtype), cache[1][layer].astype(q.dtype)
    # grouped-query heads: query head h reads key/value head h // (H / KV), as torch's enable_gqa
    q = q.reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if keys is not None:
        probs = _dropout(probs, cfg.dropout, keys[0])
    y = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v).reshape(B, T, C)
    return _dropout(_linear(p, "attn.out", y), cfg.dropout, None if keys is None else keys[1]), cache


def _mlp(cfg: ModelConfig, p: Params, x: jax.Array, key: jax.Array | None) -> jax.Array:
    if cfg.mlp == "swiglu":
        h = jax.nn.silu(_linear(p, "mlp.gate", x)) * _linear(p, "mlp.up", x)
    elif cfg.mlp == "relu2":
        h = jnp.square(jax.nn.relu(_linear(p, "mlp.fc", x)))
    else:  # "gelu": GPT-2's tanh approximation; "gelu_exact": erf, as nanoGPT's nn.GELU()
        h = jax.nn.gelu(_linear(p, "mlp.fc", x), approximate=cfg.mlp == "gelu")
    return _dropout(_linear(p, "mlp.down", h), cfg.dropout, key)


def _run(
    params: Params,
    cfg: ModelConfig,
    idx: jax.Array,
    positions: jax.Array,
    visible: jax.Array,
    cache: Cache | None,
    slots: jax.Array | None,
    key: jax.Array | None,
    remat: bool,
    dtype: Any,
    logits_at: jax.Array | None,
) -> tuple[jax.Array, Cache | None]:
    """The body shared by `forward` and `forward_cached`."""
    # mixed precision as torch.autocast computes it: the residual stream, embeddings and norms in fp32, each block's
    # attention and MLP (their input and weights cast) in `dtype`
    positions = jnp.minimum(positions, cfg.block_size - 1)  # a padding slot past the context takes the last one
    x = params["tok_emb.weight"][idx].astype(jnp.float32)
    if cfg.position == "learned":
        x = x + params["pos_emb.weight"][positions].astype(jnp.float32)
        rope = None
    else:
        cos, sin = (jnp.asarray(t.numpy(), dtype)[positions][:, :, None] for t in rope_tables(cfg))
        rope = (cos, sin)
    train = key is not None and cfg.dropout > 0
    if train:
        key, first = jax.random.split(key)
        x = _dropout(x, cfg.dropout, first)
    layer_keys = jax.random.split(key, (cfg.n_layer, 3)) if train else None
    x0 = x
    # model.x0_lambdas: each block's (resid_lambdas[i], x0_lambdas[i]), scanned with its parameters
    lambdas = (params["resid_lambdas"], params["x0_lambdas"]) if cfg.x0_lambdas else None

    def block(carry: tuple, layer: tuple) -> tuple[tuple, None]:
        x, cache = carry
        p, i, keys, mix = layer
        if mix is not None:
            x = mix[0] * x + mix[1] * x0
        h = _norm(cfg, p["norm1.weight"], p.get("norm1.bias"), x).astype(dtype)
        a, cache = _attention(cfg, p, h, rope, visible, cache, i, slots, keys, idx)
        x = x + a
        if not cfg.parallel_block:  # else the MLP reads the attention's input, as GPT's parallel block
            h = _norm(cfg, p["norm2.weight"], p.get("norm2.bias"), x).astype(dtype)
        return (x + _mlp(cfg, p, h, None if keys is None else keys[2]), cache), None

    if remat:  # train.activation_checkpointing: keep each block's input only, recompute the rest in backward
        block = jax.checkpoint(block)
    layers = (params["blocks"], jnp.arange(cfg.n_layer), layer_keys, lambdas)
    (x, cache), _ = jax.lax.scan(block, (x, cache), layers)
    if logits_at is not None:
        x = x[jnp.arange(x.shape[0]), logits_at][:, None]
    x = _norm(cfg, params["norm_f.weight"], params.get("norm_f.bias"), x)
    head = params.get("lm_head.weight", params["tok_emb.weight"])
    logits = jnp.einsum("btc,vc->btv", x.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
    if cfg.logit_softcap:  # as GPT's: c * tanh(logits / c)
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits, cache


def forward(
    params: Params,
    cfg: ModelConfig,
    idx: jax.Array,
    key: jax.Array | None = None,
    remat: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Next-token logits (B, T, vocab) in fp32 for token ids (B, T); with a `key`, dropout is on (training)."""
    cfg, T = cfg.resolved(), idx.shape[1]
    if T > cfg.block_size:
        raise ValueError(f"sequence of {T} tokens is longer than the context of {cfg.block_size}")
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    logits, _ = _run(params, cfg, idx, jnp.arange(T)[None], causal, None, None, key, remat, dtype, None)
    return logits


def forward_cached(
    params: Params,
    cfg: ModelConfig,
    idx: jax.Array,
    slots: jax.Array,
    cache: Cache,
    logits_at: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, Cache]:
    """Logits and the updated cache for new tokens (B, T) whose keys and values go into cache `slots` (B, T).

    A token's slot is its position, and it attends to every slot up to its own: slots past a row's last real
    token may hold stale values, which no real token reads. `logits_at` (B,): only that position's logits.
    """
    cfg = cfg.resolved()
    visible = jnp.arange(cache[0].shape[2])[None, None, :] <= slots[:, :, None]
    return _run(params, cfg, idx, slots, visible, cache, slots, None, False, dtype, logits_at)


def new_cache(cfg: ModelConfig, batch_size: int, slots: int | None = None, dtype: Any = jnp.float32) -> Cache:
    """An empty cache of `slots` (default: the context) positions for `batch_size` rows."""
    shape = (cfg.n_layer, batch_size, slots or cfg.block_size, cfg.n_kv_head, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


# ----- conversion -------------------------------------------------------------------------------------------------
def from_torch(model: GPT) -> Params:
    """The parameters of a PyTorch `GPT` (LoRA adapters merged first) in this module's layout, as fp32 arrays."""
    return from_state(model.state_dict(), model.cfg)


def from_state(state: dict[str, torch.Tensor], cfg: ModelConfig, partial: bool = False) -> Params:
    """A PyTorch state dict of `GPT(cfg)` (or anything keyed and shaped like its parameters, such as an optimizer's
    moments) in this module's layout, as fp32 arrays; with `partial`, of the parameters it holds only."""
    state = {n: t.detach().float().cpu().numpy() for n, t in state.items()}
    expected = param_shapes(cfg)
    params: Params = {"blocks": {}}
    for name in expected:
        if name != "blocks" and not (partial and name not in state):
            params[name] = _checked(state, name, expected[name])
    for name, shape in expected["blocks"].items():
        if partial and f"blocks.0.{name}" not in state:
            continue
        layers = [_checked(state, f"blocks.{i}.{name}", None) for i in range(cfg.n_layer)]
        stacked = np.stack([a.T for a in layers] if _linear_weight(name, len(shape)) else layers)  # (in, out)
        if stacked.shape != shape:
            raise ValueError(f"{name}: shape {stacked.shape}, expected {shape}")
        params["blocks"][name] = stacked
    return jax.tree.map(jnp.asarray, params)


def _linear_weight(name: str, ndim: int) -> bool:
    """Whether a block entry of `ndim` axes (the layer axis counted) is a linear weight, stored transposed here;
    value embeddings are tables, kept as PyTorch's rows."""
    return ndim == 3 and not name.endswith("value_embed.weight")


def _checked(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    if name not in state:
        raise ValueError(f"the PyTorch model has no '{name}' (merge LoRA adapters first: gptlab.lora.merge_lora)")
    if shape is not None and state[name].shape != shape:
        raise ValueError(f"{name}: shape {state[name].shape}, expected {shape}")
    return state[name]


def to_torch(params: Params, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict for `GPT(cfg)` holding these parameters (fp32); `model.load_state_dict` takes it. A tree of some
    of the parameters (as an optimizer's state may be) gives their entries only."""
    state = {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in params.items() if n != "blocks"}
    for name, a in params["blocks"].items():
        a = np.array(a, dtype=np.float32)
        for i in range(cfg.n_layer):
            layer = a[i].T if _linear_weight(name, a.ndim) else a[i]
            state[f"blocks.{i}.{name}"] = torch.from_numpy(np.ascontiguousarray(layer))
    if cfg.tie_embeddings and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def load_params(run_dir: str | Path, checkpoint: str = "best") -> tuple[Config, Params, Any]:
    """(config, parameters, tokenizer) of a gptlab run directory's checkpoint ('best' falls back to 'latest')."""
    from gptlab.train.checkpoint import load_run

    cfg, model, tokenizer = load_run(run_dir, checkpoint, "cpu")
    return cfg, from_torch(model), tokenizer


def save_params(params: Params, run_dir: str | Path, step: int) -> Path:
    """Write `params` into an existing run directory as the weights-only checkpoint `step_N`, which `latest` (and
    `gptlab sample`, `serve`, `export`) then use; returns its folder. The run's config.yaml gives the shape."""
    from gptlab.config import read_run_config
    from gptlab.train.checkpoint import load_model_tensors, model_tensors, save_checkpoint

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"'{run_dir}' is not a run directory (config.yaml missing)")
    if (run_dir / "checkpoints" / f"step_{step}").exists():
        raise ValueError(f"'{run_dir}' already has a checkpoint step_{step}: give another step")
    cfg = read_run_config(config_path).model.resolved()
    model = GPT(cfg)
    state = to_torch(params, cfg)
    if cfg.tie_embeddings:  # stored once, as the embedding
        del state["lm_head.weight"]
    load_model_tensors(model, state, "JAX parameters")
    return save_checkpoint(run_dir / "checkpoints", step, model_tensors(model), {}, {"backend": "jax"})
