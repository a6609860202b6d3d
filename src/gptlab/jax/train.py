"""Training the JAX GPT: a jitted step through optax, and the trainer behind `train.backend=jax`.

The step mirrors `gptlab.train.trainer.TrainStep`: micro-batches accumulate gradients of the loss normalised by the
whole batch's target count, the global gradient norm is clipped as `torch.nn.utils.clip_grad_norm_` clips it, and
the optimizers of `optim.py` (AdamW, with Muon on hidden matrices if asked) step at the learning rates of the shared
schedule (`lr_factor`), whose factor is passed in each step so no schedule is compiled in. `JaxTrainer` is the
PyTorch `Trainer` with this step: the same batches, callbacks, run directory and checkpoints. A checkpoint holds the
PyTorch layout (the weights and the optimizers' state converted), so `gptlab sample`, `serve` and `export` read a JAX
run as any other, and a run resumes on either backend.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from gptlab.config import Config, ModelConfig, TrainConfig
from gptlab.data.batches import IGNORE_INDEX
from gptlab.errors import GptlabError
from gptlab.jax.model import Params, forward, from_state, from_torch, jax_device, jax_dtype, to_torch
from gptlab.jax.optim import Optimizer
from gptlab.model import GPT
from gptlab.train.optim import build_optimizers
from gptlab.train.trainer import Trainer


def loss_sum(params: Params, cfg: ModelConfig, x: jax.Array, y: jax.Array, **kwargs: Any) -> jax.Array:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX (in fp32), as `lm_loss`."""
    logits = forward(params, cfg, x, **kwargs)
    valid = y != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, y, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0))


def make_train_step(cfg: ModelConfig, t: TrainConfig, opt: Optimizer, micro_batch_size: int, dtype: Any) -> Any:
    """A jitted `step(params, opt_state, x, y, factor, key) -> (params, opt_state, mean loss, grad norm)`.

    x and y (B, T) are split into micro-batches of `micro_batch_size` whose gradients add up; `factor` is the
    schedule's (the learning rates are the peaks times it); `key` draws the dropout masks (none when model.dropout
    is 0). The old parameters and optimizer state are donated.
    """

    def step(params: Params, opt_state: Any, x: jax.Array, y: jax.Array, factor: jax.Array, key: jax.Array):
        n_valid = jnp.maximum(1, jnp.sum(y != IGNORE_INDEX))
        micro = x.reshape(-1, micro_batch_size, x.shape[1]), y.reshape(-1, micro_batch_size, y.shape[1])
        keys = jax.random.split(key, micro[0].shape[0])
        drop = cfg.dropout > 0

        def accumulate(carry: tuple, batch: tuple) -> tuple[tuple, None]:
            loss, grads = carry
            xb, yb, k = batch
            value, g = jax.value_and_grad(loss_sum)(
                params, cfg, xb, yb, key=k if drop else None, remat=t.activation_checkpointing, dtype=dtype
            )
            return (loss + value / n_valid, jax.tree.map(lambda a, b: a + b / n_valid, grads, g)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, zero, (*micro, keys))
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        if t.grad_clip > 0:  # as clip_grad_norm_: scaled by clip / (norm + 1e-6) when that is below 1
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, t.grad_clip / (norm + 1e-6)), grads)
        params, opt_state = opt.update(grads, opt_state, params, factor)
        return params, opt_state, loss, norm

    return jax.jit(step, donate_argnums=(0, 1))


def unsupported(cfg: Config) -> tuple[str, str] | None:
    """The first setting train.backend=jax does not support yet, with how to proceed; None when all are."""
    t = cfg.train
    checks = [
        (t.lora_rank > 0, "train.lora_rank", "set train.lora_rank=0"),
        (t.dtype == "float16", "train.dtype=float16", "use bfloat16 or float32"),
        (t.profile, "train.profile", "set train.profile=false"),
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "several ranks (torchrun)", "run one process"),
    ]
    for failing, setting, hint in checks:
        if failing:
            return setting, f"{hint}, or train.backend=torch"
    return None


class JaxTrainStep:
    """One optimizer step of the JAX model; the same interface as `TrainStep`, so the trainer's loop is shared."""

    def __init__(self, model: GPT, t: TrainConfig, device: jax.Device, micro_batch_size: int) -> None:
        self.cfg, self.device, self.micro_batch_size = model.cfg, device, micro_batch_size
        self.dtype = jax_dtype(t.dtype, device)
        self.params = jax.device_put(from_torch(model), device)  # the PyTorch trainer's initial weights
        self.opt = Optimizer(t, self.params)
        self.opt_state = jax.device_put(self.opt.init(self.params), device)
        self.factor = 1.0
        self.seed = t.seed % 2**32  # a JAX key's seed is 32 bits
        self.count = 0  # optimizer steps taken: with the seed, it picks each step's dropout key
        self.step_fn = make_train_step(self.cfg, t, self.opt, micro_batch_size, self.dtype)
        self.eval_fn = jax.jit(functools.partial(loss_sum, cfg=self.cfg, dtype=self.dtype))
        # PyTorch AdamW over the PyTorch model: what checkpoints are written from and read into
        self.optimizers = build_optimizers(model, t, torch.device("cpu"))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.forward, self.sharded = None, False  # what the trainer reads of a PyTorch step

    def set_lr(self, factor: float) -> None:
        """The learning rates of the next step: the peaks times the schedule's factor."""
        self.factor = factor

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """One optimizer step on a batch; returns (mean loss, gradient norm before clipping)."""
        key = jax.random.fold_in(jax.random.key(self.seed), self.count)
        x, y = (jax.device_put(np.asarray(a, np.int32), self.device) for a in (x, y))
        self.params, self.opt_state, loss, norm = self.step_fn(
            self.params, self.opt_state, x, y, np.float32(self.factor), key
        )
        self.count += 1
        return loss, norm

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """(summed loss, target count) of a micro-batch, without dropout (the trainer's `evaluate` sums them)."""
        x, y = np.asarray(x, np.int32), np.asarray(y, np.int32)
        return float(self.eval_fn(self.params, x=x, y=y)), int((y != IGNORE_INDEX).sum())

    # ----- to and from the PyTorch layout of checkpoints --------------------------------------------------------
    def write_torch(self, model: GPT, weights_only: bool = False) -> None:
        """Copy the parameters (and unless `weights_only`, the optimizers' state) into the PyTorch model and
        optimizers, as if they had trained."""
        model.load_state_dict(to_torch(self.params, self.cfg))
        if weights_only:
            return
        adam, muon = self.opt_state[0][0], self.opt_state[1]
        state = {"exp_avg": to_torch(adam.mu, self.cfg), "exp_avg_sq": to_torch(adam.nu, self.cfg)}
        if muon is not None:
            state["momentum_buffer"] = to_torch(muon.momentum, self.cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        for opt in self.optimizers:
            keys = ["momentum_buffer"] if isinstance(opt, torch.optim.Muon) else ["exp_avg", "exp_avg_sq"]
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p] = {k: state[k][names[id(p)]].clone() for k in keys}
                    if "exp_avg" in keys:
                        opt.state[p]["step"] = torch.tensor(float(adam.count))

    def read_torch(self, model: GPT, step: int) -> None:
        """Take the parameters and the optimizers' state from the PyTorch model and optimizers (a resumed
        checkpoint)."""
        self.params = jax.device_put(from_torch(model), self.device)
        names = {id(p): n for n, p in model.named_parameters()}
        state: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}, "momentum_buffer": {}}
        for opt in self.optimizers:
            for p, s in opt.state.items():
                for k in state.keys() & s.keys():
                    state[k][names[id(p)]] = s[k]
        tree = {k: jax.device_put(from_state(v, self.cfg, partial=True), self.device) for k, v in state.items()}
        (adam, *others), muon = self.opt_state
        # AdamW's own count (below the trainer's steps where a float16 run's scaler skipped some)
        count = next((int(s["step"]) for opt in self.optimizers for s in opt.state.values() if "step" in s), step)
        adam = adam._replace(count=jnp.asarray(count, adam.count.dtype), mu=tree["exp_avg"], nu=tree["exp_avg_sq"])
        muon = muon._replace(momentum=tree["momentum_buffer"]) if muon is not None else None
        self.opt_state = ((adam, *others), muon)
        self.count = step


class JaxTrainer(Trainer):
    """The `Trainer` on the JAX model (train.backend=jax): one process, AdamW, the random or epoch data modes.

    The PyTorch model is kept on the CPU as the checkpoints' and callbacks' view of the weights, brought up to date
    when one asks for it (`inference_model`, `save_checkpoint`).
    """

    backend = "jax"

    def __init__(self, cfg: Config, **kwargs: Any) -> None:
        problem = unsupported(cfg)
        if problem is not None:
            raise GptlabError(f"{problem[0]} is not supported with train.backend=jax yet", problem[1])
        self.jax_device = jax_device(cfg.train.device)
        self._synced = 0  # the step the PyTorch model's weights are from
        super().__init__(cfg, **kwargs)

    def _device(self, name: str) -> torch.device:
        return torch.device("cpu")

    def session_info(self) -> dict[str, Any]:
        d = self.jax_device
        return {"backend": "jax", "jax": jax.__version__, "device": f"{d.platform}:{d.id} ({d.device_kind})"}

    def fire(self, event: str, payload: Any = None) -> None:
        if event == "on_fit_end":  # the callbacks may load the best checkpoint's weights: theirs must not be replaced
            self.inference_model()
        super().fire(event, payload)

    def fit(self) -> JaxTrainer:
        """Train until the budget (or Ctrl-C, which saves a checkpoint first); returns self."""
        try:
            super().fit()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise self.out_of_memory() from e
        return self

    def _stepper(self) -> JaxTrainStep:
        return JaxTrainStep(self.model, self.cfg.train, self.jax_device, self.micro_batch_size)

    def inference_model(self) -> GPT:
        """The PyTorch model holding the JAX parameters of the current step (for samples and task scores)."""
        if self._synced != self.step:
            self.stepper.write_torch(self.model, weights_only=True)
            self._synced = self.step
        return self.model

    def save_checkpoint(self, best: bool = False) -> Any:
        self.stepper.write_torch(self.model)
        self._synced = self.step
        return super().save_checkpoint(best)

    def _load_latest(self) -> None:
        super()._load_latest()
        self.stepper.read_torch(self.model, self.step)
        self._synced = self.step
