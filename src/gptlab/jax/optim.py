"""The PyTorch trainer's optimizers (`gptlab.train.optim`) in optax terms: AdamW with decay on the kinds
train.decay_groups names (`param_kind`, the PyTorch rule by the same names), and with train.optimizer=muon, Muon (as
`torch.optim.Muon` computes it) on the blocks' matrices and AdamW on the rest."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptlab.config import TrainConfig, decay_kinds
from gptlab.jax.model import Params
from gptlab.train.optim import param_kind

ADAM_EPS = 1e-8  # torch.optim.AdamW's default
# torch.optim.Muon's defaults: momentum, Newton-Schulz coefficients, steps and epsilon
MUON_MOMENTUM, NS_COEFFICIENTS, NS_STEPS, NS_EPS = 0.95, (3.4445, -4.7750, 2.0315), 5, 1e-7


def split(params: Params, hidden: Params | None) -> tuple[Params, Params]:
    """(the rest, the hidden matrices) of a parameter tree, each a tree of the same layout."""
    if hidden is None:
        return params, {}
    rest = {n: a for n, a in params.items() if n != "blocks"}
    rest["blocks"] = {n: a for n, a in params["blocks"].items() if not hidden["blocks"][n]}
    return rest, {"blocks": {n: a for n, a in params["blocks"].items() if hidden["blocks"][n]}}


def merge(rest: Params, hidden: Params) -> Params:
    """The tree `split` took apart."""
    return {**rest, "blocks": {**rest["blocks"], **hidden.get("blocks", {})}}


def decay_mask(params: Params, decay_groups: str) -> Params:
    """Which parameters weight decay applies to: those of the kinds `decay_groups` names (train.decay_groups), each
    classified by its PyTorch name (a block's entries stand for every layer: one axis more)."""
    kinds = decay_kinds(decay_groups)
    mask = {n: param_kind(n, a.ndim) in kinds for n, a in params.items() if n != "blocks"}
    mask["blocks"] = {n: param_kind(f"blocks.0.{n}", a.ndim - 1) in kinds for n, a in params["blocks"].items()}
    return mask


def muon_mask(params: Params) -> Params:
    """The matrices Muon takes: the blocks' linear weights (as build_optimizers: of kind "matrices" under "blocks.",
    so not a block's value embeddings)."""
    return {n: False for n in params if n != "blocks"} | {
        "blocks": {n: param_kind(f"blocks.0.{n}", a.ndim - 1) == "matrices" for n, a in params["blocks"].items()}
    }


def ns_dtype(precision: str) -> jnp.dtype:
    """train.muon_precision for XLA: "auto" is bf16 on accelerators and fp32 on every CPU (PyTorch also takes bf16
    on CPUs with native bf16 matmuls, train/muon.py; that XLA's CPU matmuls gain from them is not measured)."""
    if precision == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[precision]


def newton_schulz(g: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """An approximately orthogonal matrix of g's shape, by torch.optim.Muon's quintic Newton-Schulz, in `dtype`
    (bf16: rounded where torch rounds)."""
    a, b, c = NS_COEFFICIENTS
    f32 = jnp.float32
    x = g.astype(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(f32)))).astype(dtype).astype(f32)  # torch: a norm in x's dtype
    x = (x.astype(f32) / jnp.maximum(norm, NS_EPS)).astype(dtype)
    for _ in range(NS_STEPS):
        gram = jnp.matmul(x, x.T, preferred_element_type=f32).astype(dtype)
        update = (b * gram.astype(f32) + c * jnp.matmul(gram, gram, preferred_element_type=f32)).astype(dtype)
        x = (a * x.astype(f32) + jnp.matmul(update, x, preferred_element_type=f32)).astype(dtype)
    return x.T if tall else x


class MuonState(NamedTuple):
    momentum: Params


def muon(weight_decay: float, dtype: jnp.dtype = jnp.bfloat16) -> optax.GradientTransformation:
    """Muon's direction for stacked (layers, in, out) matrices, without its learning rate: Nesterov momentum,
    orthogonalised per layer, scaled by sqrt(max(1, out/in)), plus the decoupled weight decay."""

    def init(params: Params) -> MuonState:
        return MuonState(jax.tree.map(jnp.zeros_like, params))

    def update(grads: Params, state: MuonState, params: Params) -> tuple[Params, MuonState]:
        w = 1 - MUON_MOMENTUM
        # torch's lerp: buf.lerp_(grad, 1 - m), then grad.lerp(buf, m) (the second from the far end, as torch does)
        momentum = jax.tree.map(lambda b, g: b + w * (g - b), state.momentum, grads)
        nesterov = jax.tree.map(lambda b, g: b - (b - g) * w, momentum, grads)

        def direction(u: jax.Array, p: jax.Array) -> jax.Array:
            ratio = max(1.0, u.shape[2] / u.shape[1]) ** 0.5  # torch's (out, in) shape: sqrt(max(1, out / in))
            return weight_decay * p + ratio * jax.vmap(lambda m: newton_schulz(m, dtype))(u).astype(p.dtype)

        return jax.tree.map(direction, nesterov, params), MuonState(momentum)

    return optax.GradientTransformation(init, update)


class Optimizer:
    """The optimizer `build_optimizers` makes, as one state and one update; the learning rates are the peak ones times
    the schedule's factor, given at each update (so no schedule is compiled in)."""

    def __init__(self, t: TrainConfig, params: Params) -> None:
        self.hidden = muon_mask(params) if t.optimizer == "muon" else None
        rest, _ = split(params, self.hidden)
        decay = t.weight_decay
        self.adam = optax.chain(
            optax.scale_by_adam(b1=t.beta1, b2=t.beta2, eps=ADAM_EPS),
            optax.add_decayed_weights(decay, mask=decay_mask(rest, t.decay_groups)),
        )
        # the hidden matrices are all of the kind "matrices", as in build_optimizers
        muon_decay = decay if "matrices" in decay_kinds(t.decay_groups) else 0.0
        self.muon = muon(muon_decay, ns_dtype(t.muon_precision)) if self.hidden is not None else None
        self.lr, self.muon_lr = t.lr, t.muon_lr

    def init(self, params: Params) -> tuple[Any, Any]:
        rest, hidden = split(params, self.hidden)
        return self.adam.init(rest), self.muon.init(hidden) if self.muon else None

    def update(self, grads: Params, state: tuple, params: Params, factor: jax.Array) -> tuple[Params, tuple]:
        """The parameters after one step, and the new state."""
        (g_rest, g_hidden), (p_rest, p_hidden) = split(grads, self.hidden), split(params, self.hidden)
        u_rest, adam_state = self.adam.update(g_rest, state[0], p_rest)
        p_rest = optax.apply_updates(p_rest, jax.tree.map(lambda u: -self.lr * factor * u, u_rest))
        muon_state = state[1]
        if self.muon is not None:
            u_hidden, muon_state = self.muon.update(g_hidden, muon_state, p_hidden)
            p_hidden = optax.apply_updates(p_hidden, jax.tree.map(lambda u: -self.muon_lr * factor * u, u_hidden))
        return merge(p_rest, p_hidden), (adam_state, muon_state)
