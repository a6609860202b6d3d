"""The training loop: batches -> forward/backward -> optimizer step, with events for callbacks.

The batch of step s is a pure function of (seed, epoch, s) and the learning rate a pure function of
s, so a checkpoint needs only weights, optimizer state, RNG states and the step to resume exactly. Under
torchrun each rank takes rows r::world of every batch (`distributed.py`); the loss is normalised by the
whole batch's target count, so the gradients, and the losses, do not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from gptlab import threads
from gptlab.chat import load_chat_template
from gptlab.config import Config, TaskConfig, TrainConfig, read_run_config, to_yaml
from gptlab.data.batches import IGNORE_INDEX, Batches, ExampleBatches, load_prepared, prefetch
from gptlab.data.shards import write_atomic
from gptlab.data.tasks import TASK_SETTINGS, changed_settings
from gptlab.decode import cpp_compiler
from gptlab.errors import GptlabError, Interrupted, is_write_failure, write_error
from gptlab.model import GPT
from gptlab.progress import console
from gptlab.train import checkpoint as ckpt
from gptlab.train import distributed, tracking
from gptlab.train.callbacks import (
    Callback,
    Checkpointer,
    EarlyStopping,
    Evaluator,
    HistoryPrinter,
    MetricsLogger,
    ProgressCallback,
    check_monitor,
    improves,
    metrics_lines,
)
from gptlab.train.ema import EMA
from gptlab.train.muon import Muon
from gptlab.train.optim import build_optimizers, set_lr
from gptlab.train.schedules import lr_factor
from gptlab.train.task_metrics import check_task_context

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# keys that define the model or the stream of batches: a resumed run must keep them
FROZEN_ON_RESUME = (
    "model", "data", "train.seed", "train.batch_size", "train.data_mode", "train.lora_", "train.monitor",
    "train.decay_groups",  # the optimizer state's groups come from the checkpoint
    *(f"task.{k}" for k in TASK_SETTINGS),
)  # fmt: skip


RANDOM_EVAL_INTERVAL = 250  # train.eval_interval when it is null in random mode (config.py)


def eval_interval(t: TrainConfig) -> int | None:
    """Steps between evaluations: train.eval_interval, else 250 in random mode, None (epoch ends only) in epoch mode."""
    if t.eval_interval is not None:
        return t.eval_interval
    return RANDOM_EVAL_INTERVAL if t.data_mode == "random" else None


def _count(x: float) -> str:
    """1.5333 -> '1.53', 5.0 -> '5': an epoch count for the budget line."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def budget(t: TrainConfig, steps_per_epoch: int, tokens_per_step: int) -> tuple[int, str]:
    """The steps of the smallest budget set, and the line that says which one it is before the first step.

    `budget: 2000 steps (max_iters) ends before max_epochs=5 (1.53 epochs of 1307 steps; ...)`: a max_epochs that
    another budget cuts short is named with the setting that would reach it, as the smallest budget still wins."""
    steps = {}
    if t.max_iters is not None:
        steps["max_iters"] = t.max_iters
    if t.max_tokens is not None:
        steps["max_tokens"] = math.ceil(t.max_tokens / tokens_per_step)
    if t.max_epochs is not None:
        steps["max_epochs"] = t.max_epochs * steps_per_epoch
    total = min(steps.values())
    first = [k for k, v in steps.items() if v == total]
    later = [k for k, v in steps.items() if v > total]
    line = f"budget: {total} steps ({', '.join(first)})"
    # epochs mean passes over the data in epoch mode; in random mode only where max_epochs counts them
    epochs = f"{_count(total / steps_per_epoch)} epochs of {steps_per_epoch} steps"
    show_epochs = t.data_mode == "epoch" or "max_epochs" in steps
    if not later:
        return total, line + (f" = {epochs}" if show_epochs else "")
    line += " ends before " + ", ".join(f"{k}={getattr(t, k)}" for k in later)
    if "max_epochs" in later:  # the user asked for epochs they will not get: say what would give them
        cut = [f"train.{k}=null" for k, v in steps.items() if v < steps["max_epochs"]]
        return total, f"{line} ({epochs}; {' '.join(cut)} to train all {t.max_epochs} epochs)"
    return total, line + (f" ({epochs})" if show_epochs else "")


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GptlabError(f"unknown device '{name}'", "use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("device 'cuda' was asked for but CUDA is not available", "use train.device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptlabError("device 'mps' was asked for but MPS is not available", "use train.device=auto or cpu")
    return device


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on CUDA where supported, fp32 elsewhere (bf16 on CPU is measured slower)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `dtype`, a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX (in fp32)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )  # fmt: skip


def micro_batch_size(t: TrainConfig, world: int) -> int:
    """Sequences per forward on one rank: train.micro_batch_size, which must divide the rank's batch."""
    if t.batch_size % world:
        raise GptlabError(f"batch size {t.batch_size} is not divisible by {world} ranks", "change train.batch_size")
    per_rank = t.batch_size // world
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise GptlabError(
            f"train.micro_batch_size={micro} does not divide the per-rank batch of {per_rank}",
            f"pick a divisor of {per_rank}",
        )
    return micro


def check_world(t: TrainConfig, world: int) -> None:
    """Refuse a number of ranks the batch cannot be shared by, or more GPUs than there are."""
    if world < 1:
        raise GptlabError(f"--nproc must be at least 1, got {world}", "e.g. --nproc 2")
    if t.backend == "jax" and world > 1:
        raise GptlabError("train.backend=jax trains in one process", "drop --nproc, or use train.backend=torch")
    micro_batch_size(t, world)
    if select_device(t.device).type == "cuda" and world > torch.cuda.device_count():
        raise GptlabError(
            f"{world} ranks were asked for but this machine has {torch.cuda.device_count()} GPUs",
            f"use --nproc {torch.cuda.device_count()} or fewer",
        )


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies within it (both resolved)."""
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


def compile_pays(device: torch.device, total_steps: int | None) -> bool:
    """`train.compile: null`: torch.compile where it was measured to pay: CUDA, and CPU for runs of 1000+ steps.

    On CPU (benchmarks/RESULTS.md) compiled steps of small models are 10-15% faster, but compiling costs ~20 s
    on a first run and a few s with inductor's cache warm: the default recipe gains from ~1000 steps on (warm
    cache), so short runs such as smoke tests stay eager. Linux only, with the C++ compiler inductor needs.
    """
    if device.type == "cuda":
        return True
    long_run = total_steps is None or total_steps >= 1000
    return device.type == "cpu" and long_run and sys.platform == "linux" and cpp_compiler() is not None


class TrainStep:
    """Forward, backward and optimizer step of one batch; shared by the trainer and `gptlab bench`.

    With several ranks the model is wrapped (DDP) or sharded (FSDP2) first, and the optimizers are built on
    what that leaves; each rank's loss is its share of the global mean, so the averaged gradients are exact.
    """

    def __init__(
        self,
        model: GPT,
        t: TrainConfig,
        device: torch.device,
        micro_batch_size: int,
        total_steps: int | None = None,
        dist: distributed.Dist = distributed.SINGLE,
    ) -> None:
        self.model, self.device, self.micro_batch_size, self.dist = model, device, micro_batch_size, dist
        self.dtype = select_dtype(t.dtype, device)
        self.grad_clip = t.grad_clip
        model.checkpoint_blocks = t.activation_checkpointing
        if dist.world > 1:
            distributed.check_parallel(t.parallel, t.optimizer, self.dtype)
        self.module = distributed.wrap(model, t.parallel, dist, device, self.dtype)
        self.sharded = distributed.is_sharded(model)
        # FSDP2 casts the parameters for compute itself (its mixed-precision policy); the rest use autocast
        self.compute_dtype = torch.float32 if self.sharded else self.dtype
        # torch's CPU threads: --threads N, or on one CPU process a count chosen by timing the steps (threads.py)
        self.threads = threads.governor(adaptive=device.type == "cpu" and dist.world == 1)
        use_compile = t.compile if t.compile is not None else compile_pays(device, total_steps)
        # inductor's C++ kernels otherwise fix their team size at compile time (unless it is the CPU count): the
        # governor's count must reach them
        options = {"cpp.dynamic_threads": True} if self.threads.adaptive and device.type == "cpu" else None
        self.forward = torch.compile(self.module, options=options) if use_compile else self.module
        self.optimizers = build_optimizers(model, t, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        # train.ema: the weights' moving average, updated after each optimizer step (the same on every rank)
        self.ema = EMA(model, t.ema) if t.ema > 0 else None

    def set_lr(self, factor: float) -> None:
        """Set every group's learning rate to its peak times the schedule's factor."""
        set_lr(self.optimizers, factor)

    def eval_loss(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> tuple[float, int]:
        """(summed loss, target count) of a micro-batch, under no_grad with the model in eval mode (the caller's)."""
        # on CPU a compiled no-grad graph costs 5-10 s to build and saves less than that over a run's evaluations
        forward = self.model if self.device.type == "cpu" else self.forward
        xb, yb = self.to_device(x), self.to_device(y)
        with autocast(self.device, self.compute_dtype):
            logits = forward(xb)
        return float(lm_loss(logits, yb)), int((yb != IGNORE_INDEX).sum())

    def to_device(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
        if self.device.type == "cuda":  # the prefetch thread has usually pinned it already
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def __call__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's rows, split into micro-batches; returns (this rank's share of the
        mean loss, grad norm). Only the last micro-batch all-reduces gradients."""
        with self.threads.unit():
            return self._step(x, y)  # governed on CPU only, where ops finish before they return

    def _step(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step `__call__` runs at the governed thread count."""
        n_valid = int((y != IGNORE_INDEX).sum())
        if self.dist.world > 1:  # sft rows hold different numbers of targets: count the whole batch's
            n_valid = int(self.dist.all_sum(torch.tensor([n_valid], dtype=torch.int64, device=self.device)))
        n_valid = max(1, n_valid)
        total = torch.zeros((), device=self.device)
        for i in range(0, len(x), self.micro_batch_size):
            xb = self.to_device(x[i : i + self.micro_batch_size])
            yb = self.to_device(y[i : i + self.micro_batch_size])
            with distributed.gradient_sync(self.module, sync=i + self.micro_batch_size >= len(x)):
                with autocast(self.device, self.compute_dtype):
                    logits = self.forward(xb)
                loss = lm_loss(logits, yb) / n_valid  # normalised by the whole batch, so accumulation is exact
                # DDP and FSDP average the ranks' gradients: scaled by the world size they add up instead
                self.scaler.scale(loss * self.dist.world if self.dist.world > 1 else loss).backward()
            total += loss.detach()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every rank
            grad_norm = grad_norm.full_tensor()
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return total, grad_norm


class Trainer:
    """Trains a GPT on prepared data into a run directory; `fit()` runs it.

    Events (`on_train_start`, `on_step`, `on_interval_end`, `on_epoch_end`, `on_eval`, `on_checkpoint`,
    `on_train_end`) go to the callbacks in order; evaluation, checkpoints, metrics.jsonl and the history are
    callbacks too (`default_callbacks`). `callbacks=[...]` adds yours after them; with `replace_callbacks=True`
    yours replace them, and the run writes no metrics, evaluations or checkpoints unless yours do.
    """

    backend = "torch"  # the train.backend this class trains

    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: list[Callback] | None = None,
        quiet: bool = False,
        ephemeral: bool = False,
        allow_dirty: bool = False,
        replace_callbacks: bool = False,
        checkpoint: str = "latest",
    ) -> None:
        """`callbacks`: run after the default ones (or instead of them, with `replace_callbacks`).
        `ephemeral`: build the model, optimizers and batches only, touching no run directory (the LR finder).
        `allow_dirty`: train even when train.require_clean_git finds uncommitted changes (`--allow-dirty`).
        `checkpoint`: what a resume starts from: latest, best or step_N (what came after an older one is set aside)."""
        if ephemeral and (resume or overwrite):
            raise ValueError("an ephemeral trainer neither resumes nor overwrites a run directory")
        if checkpoint != "latest" and not resume:
            raise GptlabError(f"--checkpoint {checkpoint} is given without --resume", "add --resume RUN_DIR")
        self.resume_from = checkpoint
        if cfg.train.backend != self.backend:
            raise GptlabError(
                f"train.backend={cfg.train.backend} is not trained by {type(self).__name__}",
                "use `gptlab train`, or gptlab.jax.train.JaxTrainer for train.backend=jax",
            )
        if cfg.train.ema and self.backend != "torch":  # the average lives in the PyTorch step (train/ema.py)
            raise GptlabError(
                f"train.ema is not supported with train.backend={self.backend} yet",
                "set train.ema=0, or train.backend=torch",
            )
        self.dist, self._owns_group = distributed.SINGLE, False
        self.device = self._device(cfg.train.device)
        if not ephemeral:  # under torchrun: join the other ranks (and leave them again if set-up fails)
            self.dist, self.device, self._owns_group = distributed.init(self.device, cfg.train.dist_timeout)
        try:
            self._set_up(cfg, resume, overwrite, quiet, ephemeral, allow_dirty)
            # the user's callbacks come after the defaults, which fire the events they may listen to (on_eval)
            defaults = [] if replace_callbacks else self.default_callbacks()
            self.callbacks = [*defaults, *(callbacks or [])]
        except BaseException as e:
            if self._owns_group:
                distributed.shutdown(clean=False)
            if isinstance(e, RuntimeError) and self.dist.world > 1 and distributed.lost_peer(e):
                raise distributed.peer_error(e, cfg.train.dist_timeout) from e  # rank 0 failed while we waited
            raise

    def _set_up(
        self,
        cfg: Config,
        resume: bool,
        overwrite: bool,
        quiet: bool,
        ephemeral: bool,
        allow_dirty: bool,
    ) -> None:
        self.run_dir = Path(cfg.train.out_dir)
        self.resume, self.quiet = resume, quiet
        self.data = load_prepared(cfg.data.dir)
        cfg = self._with_task(cfg)
        check_monitor(cfg.train.monitor, task=cfg.task.name != "none")  # now, not after the first epoch's work
        cfg, base = self._load_base(cfg)  # before seeding: loading a Hugging Face model draws random numbers
        cfg = self._with_vocab(cfg)
        if self.data.meta.get("format") == "task":
            check_task_context(self.data.examples, cfg.model.block_size)
        self.cfg = cfg
        t = cfg.train
        self._check_lora_vocab(base)
        self.base_fingerprint = ckpt.base_fingerprint(base.model) if base and t.lora_rank else None

        torch.manual_seed(t.seed)  # the same on every rank: the same initial weights
        self.model = ckpt.build_model(cfg, base).to(self.device)
        if self.dist.rank:  # other dropout masks on each rank's rows (rank 0 draws as a single process does)
            torch.manual_seed(t.seed + self.dist.rank)
        self._plain: GPT | None = None  # rank 0's unsharded copy for generation under FSDP
        # of the base only its chat template is kept (gpt2-xl's weights are 6 GB of memory)
        self.base_template = base.chat_template if base else None
        self.micro_batch_size = micro_batch_size(t, world=self.dist.world)
        T = cfg.model.block_size
        self.train_batches, self.val_batches = self._batches(cfg)
        self.steps_per_epoch = self.train_batches.steps_per_epoch
        self.tokens_per_step = t.batch_size * T
        self.eval_interval = eval_interval(t)
        # which budget ends the run, said before the first step (printed once the set-up has succeeded)
        self.total_steps, self.budget_note = budget(t, self.steps_per_epoch, self.tokens_per_step)
        self.stepper = self._stepper()
        self.dtype, self.forward = self.stepper.dtype, self.stepper.forward
        self.optimizers, self.scaler = self.stepper.optimizers, self.stepper.scaler

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self._epoch_loss, self._epoch_steps = 0.0, 0
        self._interval_loss, self._interval_steps = 0.0, 0  # since the last evaluation: a mid-epoch row's train loss
        self._stop_requested = False  # Ctrl-C or SIGTERM: save a checkpoint and stop
        self._stop_signal: int = signal.SIGINT  # which of them this rank received first
        self._stop_agreed = False  # with several ranks: some rank was asked to stop (all stop at the same step)
        self._agreed_signal: int = signal.SIGINT  # ... and the signal they stop for (SIGTERM if any rank got it)
        # the signal (SIGINT, SIGTERM) that stopped fit() after saving a checkpoint; None when the run finished
        self.interrupted: int | None = None
        self.stop_reason: str | None = None  # set by a callback (early stopping): stop after this step
        self.results: dict[str, Any] = {}  # what the end of a finished run measured (a task's test score)
        self.failed = False  # fit ended in an error: on_train_end callbacks keep the files of the last good state
        # the run directory is written only once everything is checked and a resumed checkpoint has loaded
        self.git: tracking.GitState | None = None
        if not ephemeral:
            self.git = tracking.check_git(t.require_clean_git and not allow_dirty)
            tracking.check_tracking(cfg, self.data)
            self._check_run_dir(overwrite)
            if resume:
                self._load_latest()
            self.dist.barrier()  # every rank has checked the run directory before rank 0 writes it
            if self.dist.is_main:
                if resume:
                    try:
                        self._clear_later_steps(quiet)
                    except OSError as e:
                        if not is_write_failure(e):
                            raise
                        raise write_error(e) from e
                self._write_run_dir(overwrite)
                if not quiet:  # in yellow when the epochs asked for will not all be trained
                    cut_short = t.max_epochs is not None and self.total_steps < t.max_epochs * self.steps_per_epoch
                    style = "yellow" if cut_short else None
                    console.print(self.budget_note, style=style, highlight=False, markup=False, soft_wrap=True)
                parallel = t.parallel if self.dist.world > 1 else "none"
                tracking.start_session(
                    self.run_dir,
                    self.git,
                    self.device,
                    self.step,
                    quiet,
                    self.dist.world,
                    parallel,
                    self.session_info(),
                )
            self.dist.barrier()

    def _clear_later_steps(self, quiet: bool) -> None:
        """Out of the resumed trajectory's way: the step folders after the checkpoint it starts from.

        From `latest`, they were renamed in by a run killed before it pointed there, and are dropped. From an older
        checkpoint (--checkpoint step_N or best) they are the run's own later work: set aside, nothing deleted."""
        root = self.run_dir / "checkpoints"
        latest = ckpt.read_pointer(root / "latest")
        if self.resume_from == "latest" or latest == f"step_{self.step}":
            dropped = ckpt.drop_after(root, self.step)
            if dropped and not quiet:
                console.print(f"dropped {', '.join(dropped)}: written after step {self.step}, which "
                              "`latest` names, by a run that was killed before it pointed there")  # fmt: skip
            return
        best_step, best = None, None  # the best as of this step, as the Checkpointer chose it
        for record in self.history:
            if self.cfg.train.monitor in record and improves(record[self.cfg.train.monitor], best,
                                                             self.cfg.train.monitor_mode):  # fmt: skip
                best_step, best = record["step"], record[self.cfg.train.monitor]
        aside, moved = ckpt.set_aside(self.run_dir, self.step, None if best_step is None else f"step_{best_step}")
        if not quiet:
            later = ", ".join(moved) or "no step folder"
            line = f"resuming from step_{self.step} (latest was {latest}): {later} and later metrics moved to {aside}"
            console.print(line, soft_wrap=True, highlight=False, markup=False)

    # ----- set-up -----------------------------------------------------------------------------
    def _stepper(self) -> TrainStep:
        """What runs one optimizer step (another backend's trainer returns its own)."""
        t = self.cfg.train
        return TrainStep(self.model, t, self.device, self.micro_batch_size, self.total_steps, self.dist)

    def session_info(self) -> dict[str, Any]:
        """What run.json records of this session besides the common fields (the backend, its device)."""
        info: dict[str, Any] = {"backend": self.backend}
        for opt in self.optimizers:  # Muon's precision follows the device (train/muon.py): say which it took
            if isinstance(opt, Muon):
                info["muon_precision"] = str(opt.ns_dtype).removeprefix("torch.")
        return info

    def _device(self, name: str) -> torch.device:
        """The device of the PyTorch model, from train.device."""
        return select_device(name)

    def _load_base(self, cfg: Config) -> tuple[Config, ckpt.Pretrained | None]:
        """The model `model.init_from` names (not needed to resume a full fine-tune), and the config shaped by it."""
        init_from = cfg.model.init_from
        if init_from == "scratch":
            return cfg, None
        if self.resume and not cfg.train.lora_rank:  # the checkpoint holds every weight: the base's shape will do
            return replace(cfg, model=ckpt.init_config(ckpt.init_source_config(init_from), cfg.model)), None
        base = ckpt.load_init(init_from)
        cfg = replace(cfg, model=ckpt.init_config(base.model.cfg, cfg.model))
        if cfg.sample.end_tokens is None and base.end_tokens:  # a fine-tuned instruct model ends as its base did
            cfg = replace(cfg, sample=replace(cfg.sample, end_tokens=base.end_tokens))
        if cfg.model.block_size < base.model.cfg.block_size and not self.quiet and self.dist.is_main:
            console.print(f"{init_from}: context cropped from {base.model.cfg.block_size} to {cfg.model.block_size} "
                          "tokens (model.block_size)")  # fmt: skip
        ours = self.data.tokenizer().hf.get_vocab(with_added_tokens=True)
        theirs = base.tokenizer.hf.get_vocab(with_added_tokens=True)
        differ = sum(ours.get(token) != i for token, i in theirs.items())
        if differ:  # the data may add tokens (new specials), not renumber the model's
            hint = "gpt2" if base.tokenizer.kind == "gpt2" else "the tokenizer.json of " + init_from
            raise GptlabError(
                f"the data in '{self.data.dir}' was prepared with another tokenizer than {init_from}'s "
                f"({differ} of its {len(theirs)} tokens have other ids)",
                f"prepare the data with data.tokenizer={hint}",
            )
        return cfg, base

    def _with_task(self, cfg: Config) -> Config:
        """A task's data carries its settings: a config naming another task (or none for a task's data) is refused."""
        meta = self.data.meta
        if meta.get("format") != "task":
            if cfg.task.name != "none":
                raise GptlabError(
                    f"task.name is {cfg.task.name} but '{self.data.dir}' holds no task examples",
                    "run `gptlab prepare` with this config first, or set data.dir to the task's folder",
                )
            return cfg
        if cfg.task.name == "none":  # training on a task's folder: take the task from it
            return replace(cfg, task=TaskConfig(**{**meta["settings"], "eval_examples": cfg.task.eval_examples}))
        changed = changed_settings(meta["settings"], cfg.task)
        if changed:
            raise GptlabError(
                f"the examples in '{self.data.dir}' were prepared with other task settings ({', '.join(changed)})",
                "run `gptlab prepare` with this config (--overwrite), or set data.dir to a new folder",
            )
        return cfg

    def request_stop(self, reason: str) -> None:
        """Finish the run after the current step, as if its budget were spent (early stopping calls this)."""
        self.stop_reason = reason

    def _check_lora_vocab(self, base: ckpt.Pretrained | None) -> None:
        if base is None or not self.cfg.train.lora_rank:
            return
        grown = self.cfg.model.vocab_size - base.model.cfg.vocab_size
        if grown > 0:
            raise GptlabError(
                f"the data's tokenizer adds {grown} tokens to {self.cfg.model.init_from}'s, whose embeddings LoRA "
                "would keep frozen and untrained",
                "fine-tune without train.lora_rank, or prepare the data with the base model's own tokenizer",
            )

    def _with_vocab(self, cfg: Config) -> Config:
        data_vocab = int(self.data.meta["vocab_size"])
        model_cfg = cfg.model
        if model_cfg.vocab_size == 0 or (model_cfg.init_from != "scratch" and model_cfg.vocab_size < data_vocab):
            model_cfg = replace(model_cfg, vocab_size=data_vocab)  # from scratch, or a base growing new tokens
        elif model_cfg.vocab_size < data_vocab:
            raise GptlabError(
                f"vocabulary mismatch: the data in '{self.data.dir}' has {data_vocab} token ids, "
                f"model.vocab_size is {model_cfg.vocab_size}",
                "set model.vocab_size=0 to take it from the data, or prepare the data with the model's tokenizer",
            )
        return replace(cfg, model=model_cfg.resolved())

    def _check_run_dir(self, overwrite: bool) -> None:
        """Refuse a run directory that cannot be resumed, or that exists without --resume/--overwrite."""
        config_path = self.run_dir / "config.yaml"
        run_tokenizer = self.run_dir / "tokenizer.json"
        if self.resume:
            if not config_path.is_file():
                raise GptlabError(
                    f"no run to resume in '{self.run_dir}' (config.yaml missing)", "train it first without --resume"
                )
            if ckpt.read_pointer(self.run_dir / "checkpoints" / "latest") is None:
                raise GptlabError(
                    f"run '{self.run_dir}' has no checkpoint to resume: it stopped before its first one",
                    "start it again with --overwrite",
                )
            ckpt.resume_checkpoint(self.run_dir, self.resume_from)  # a folder that is there, or the ones that are
            same = run_tokenizer.is_file() and run_tokenizer.read_bytes() == self.data.tokenizer_path.read_bytes()
            if not same:
                raise GptlabError(
                    f"vocabulary mismatch: the data in '{self.data.dir}' was prepared with another tokenizer "
                    "than this run",
                    "resume with the data the run was trained on, or start a new run",
                )
            saved = read_run_config(config_path)
            # damaged files the resume would read only after it has written to the run: refused now
            tracking.read_sessions(self.run_dir / "run.json")
            metrics_lines(self.run_dir / "metrics.jsonl")
            old = asdict(replace(saved, model=saved.model.resolved()))
            changed = [k for k in _diff_keys(old, asdict(self.cfg)) if k.startswith(FROZEN_ON_RESUME)]
            if changed:
                raise GptlabError(
                    f"cannot resume with changed {', '.join(changed)}",
                    "resume keeps the model, data, task, seed, batch size, data mode, monitored metric, weight-decay "
                    "groups and LoRA settings; start a new run to change them",
                )
        elif overwrite and _inside(Path(self.cfg.model.init_from), self.run_dir):
            raise GptlabError(
                f"model.init_from '{self.cfg.model.init_from}' is inside train.out_dir '{self.run_dir}', which "
                "--overwrite would delete",
                "set train.out_dir to another folder",
            )
        elif self.run_dir.is_file():
            raise GptlabError(f"train.out_dir '{self.run_dir}' is a file", "set train.out_dir to a folder")
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not overwrite:
            raise GptlabError(
                f"run directory '{self.run_dir}' already exists",
                "pass --resume to continue it, --overwrite to start over, or set train.out_dir",
            )

    def _write_run_dir(self, overwrite: bool) -> None:
        """Start (or, with --overwrite, restart) the run directory: config.yaml and a copy of the tokenizer."""
        try:
            if overwrite and not self.resume and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg).encode())
        except OSError as e:
            raise GptlabError(
                f"cannot write the run directory '{self.run_dir}' ({e.strerror or e})",
                "set train.out_dir to a folder you can write",
            ) from e
        write_atomic(self.run_dir / "tokenizer.json", self.data.tokenizer_path.read_bytes())
        # the chat template goes with the tokenizer: the data's (sft), else the base model's
        template = load_chat_template(self.data.dir, self.data.tokenizer()) or self.base_template
        if template is not None:
            template.save(self.run_dir)

    def _batches(self, cfg: Config) -> tuple[Batches | ExampleBatches, Batches | ExampleBatches]:
        """Train and validation batches; validation's are the same every evaluation, so the numbers compare."""
        t, T = cfg.train, cfg.model.block_size
        ranks = {"rank": self.dist.rank, "world": self.dist.world}
        if self.data.examples is None:
            train = Batches(self.data.train, T, t.batch_size, t.data_mode, t.seed, eval_interval(t), **ranks)
            val = Batches(self.data.val, T, t.batch_size, t.data_mode, t.seed + 1, t.eval_iters, split="val", **ranks)
            return train, val
        pad = self.data.meta["eot_id"] or 0  # padding is never attended to by a real token nor a target
        ex = self.data.examples
        train = ExampleBatches(ex["train"], T, t.batch_size, t.data_mode, t.seed, eval_interval(t), pad_id=pad, **ranks)
        val = ExampleBatches(
            ex["val"], T, t.batch_size, "random", t.seed + 1, t.eval_iters, split="val", pad_id=pad, **ranks
        )
        if train.truncated and not self.quiet and self.dist.is_main:
            console.print(f"[yellow]{train.truncated} of {len(ex['train'])} examples are longer than the context of "
                          f"{T} tokens: long prompts lose their start, then responses their end "
                          "(raise model.block_size to keep them)[/]")  # fmt: skip
        return train, val

    def default_callbacks(self) -> list[Callback]:
        """metrics.jsonl, progress, tracking (as train.* asks), evaluation, checkpoints, early stopping, history."""
        t = self.cfg.train
        callbacks = [
            MetricsLogger(self.run_dir / "metrics.jsonl"),
            ProgressCallback(t.log_interval, enabled=not self.quiet),
            *tracking.callbacks(self),  # samples, TensorBoard, W&B, profiler (as train.* asks)
            Evaluator(),
            Checkpointer(t.monitor, t.monitor_mode, 1 if t.save == "best" else t.keep_last),  # best: and the latest
            HistoryPrinter(self.run_dir / "history.json", enabled=not self.quiet),
        ]
        if t.early_stop_patience:  # after the checkpointer: the evaluation that stops the run is saved first
            stopper = EarlyStopping(t.monitor, t.monitor_mode, t.early_stop_patience, t.early_stop_min_delta)
            callbacks.insert(len(callbacks) - 1, stopper)
        return callbacks

    def fire(self, event: str, payload: Any = None) -> None:
        """Send an event to every callback, in order (on ranks other than 0, to those that run on all ranks)."""
        for cb in self.callbacks:
            if self.dist.is_main or cb.all_ranks:
                getattr(cb, event)(self, payload) if payload is not None else getattr(cb, event)(self)

    def inference_model(self) -> GPT | None:
        """The model as one plain GPT for generation (task scores, samples) on rank 0; None on the other ranks.

        Under FSDP its weights are gathered from the shards into a copy: a collective every rank must call.
        """
        if not self.stepper.sharded:
            return self.model if self.dist.is_main else None
        state = distributed.full_state(self.model)
        if not self.dist.is_main:
            return None
        if self._plain is None:
            with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the training RNG
                self._plain = ckpt.build_model(self.cfg).to(self.device)
        self._plain.load_state_dict(state, strict=False)
        return self._plain

    @property
    def ema(self) -> EMA | None:
        """The weights' moving average (train.ema), or None when it is off (or the backend keeps none)."""
        return getattr(self.stepper, "ema", None)

    def averaged(self) -> contextlib.AbstractContextManager:
        """Within it the model holds the weights' moving average (train.ema), what evaluations and samples measure
        and checkpoints save as the model; a no-op when train.ema is off. Every rank must enter it (FSDP)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The whole state dict model.safetensors is written from (the moving average's with train.ema): on rank 0,
        gathered from the shards under FSDP (a collective); {} on the other ranks unless sharded."""
        if self.stepper.sharded:
            with self.averaged():
                return distributed.full_state(self.model)
        if not self.dist.is_main:
            return {}
        if self.ema is None:
            return distributed.full_state(self.model)
        return self.ema.weights(self.model.state_dict())

    # ----- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, best: bool = False) -> Path:
        """Write the full training state at the current step (atomically; with `best`, as the best so far).

        A collective: rank 0 writes the whole weights and the run's state, every rank its training state."""
        t = self.cfg.train
        full = self._model_state()  # the moving average's weights with train.ema; the raw ones go to train_state
        rngs = self.dist.gather(ckpt.rng_state())
        ema = self.ema
        train_state = ckpt.training_state(self.model, self.optimizers, None if ema is None else ema.state_dict())
        weights = state = meta = None
        if self.dist.is_main:
            weights = ckpt.model_tensors(self.model, full)
            state = {
                "step": self.step, "scaler": self.scaler.state_dict(), "rng": rngs, "best_metric": self.best_metric,
                "history": self.history, "epoch_loss": self._epoch_loss, "epoch_steps": self._epoch_steps,
                "interval_loss": self._interval_loss, "interval_steps": self._interval_steps,
            }  # fmt: skip
            meta = {
                "world_size": self.dist.world,
                "parallel": t.parallel if self.dist.world > 1 else "none",
                "optimizer": t.optimizer,
                "backend": t.backend,
                "epoch": max(0, self.step - 1) // self.steps_per_epoch,
                "tokens": self.step * self.tokens_per_step,
            }
            if self.base_fingerprint is not None:  # a LoRA checkpoint names the base its adapters belong to
                meta["base_fingerprint"] = self.base_fingerprint
            if ema is not None:  # model.safetensors holds the average; train_state/ the raw weights and "ema"
                meta["ema"] = {"decay": ema.decay, "updates": ema.updates}
        root = self.run_dir / "checkpoints"
        return ckpt.save_checkpoint(root, self.step, weights, state, meta, train_state, self.dist, best)

    def _load_latest(self) -> None:
        """Load the checkpoint a resume starts from (`checkpoint=`: latest unless another was chosen)."""
        path = ckpt.resume_checkpoint(self.run_dir, self.resume_from)
        meta = ckpt.read_meta(path)
        if self.base_fingerprint is not None and meta.get("base_fingerprint") != self.base_fingerprint:
            raise GptlabError(
                f"the base model '{self.cfg.model.init_from}' is not the one the adapters in '{path}' were trained on",
                "resume with the original base at model.init_from",
            )
        if meta.get("optimizer", self.cfg.train.optimizer) != self.cfg.train.optimizer:
            raise GptlabError(
                f"checkpoint '{path}' was written with train.optimizer={meta['optimizer']}",
                f"resume with train.optimizer={meta['optimizer']}",
            )
        # the optimizer state brings back the checkpoint's learning rates, decay and betas: this run's settings win
        # (a resume with train.lr=... must run at it, as its metrics say), the groups themselves are the same
        settings = [
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers
        ]
        ema = self.ema
        saved_ema = meta.get("ema")  # a checkpoint of a run with train.ema on holds the average
        if saved_ema is not None and not (isinstance(saved_ema, dict) and type(saved_ema.get("updates")) is int):
            raise GptlabError(
                f"checkpoint '{path}' is corrupted: meta.json's ema is unreadable", "pick an older checkpoint"
            )
        averages = ema.state_dict() if ema is not None and saved_ema else None
        ckpt.load_training_state(path, self.model, self.optimizers, self.dist, averages)
        if averages is not None:
            ema.load_state_dict(averages, saved_ema["updates"])
        elif ema is not None:  # train.ema newly on: the average starts from the resumed weights
            ema.reset()
            if self.dist.is_main and not self.quiet:
                console.print(f"train.ema: '{path}' holds no moving average; it starts from the resumed weights")
        for opt, groups in zip(self.optimizers, settings):
            for group, mine in zip(opt.param_groups, groups):
                group.update(mine)
        state = ckpt.load_state(path)
        if state["scaler"] and self.scaler.is_enabled():  # an fp32/bf16 run saves an empty scaler state
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]  # one per rank; ranks a run did not have keep their fresh seed (seed + rank)
        if self.dist.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.dist.rank])
        self.step = meta["step"]
        self.best_metric, self.history = state["best_metric"], state["history"]
        self._epoch_loss, self._epoch_steps = state["epoch_loss"], state["epoch_steps"]
        # checkpoints from before mid-epoch evaluations: the last evaluation was at the epoch's start
        self._interval_loss = state.get("interval_loss", self._epoch_loss)
        self._interval_steps = state.get("interval_steps", self._epoch_steps)
        saved_world = meta.get("world_size", 1)
        if saved_world != self.dist.world and self.dist.is_main and not self.quiet:
            console.print(f"resuming a checkpoint of {saved_world} rank(s) on {self.dist.world}: the global batches "
                          "are the same, each rank takes its rows of them")  # fmt: skip

    # ----- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per target token over the fixed validation batches (sft rows hold different numbers of them),
        of the weights' moving average when train.ema is on."""
        self.model.eval()
        s, n = 0.0, 0
        with self.averaged():
            for k in range(self.cfg.train.eval_iters):
                x, y = self.val_batches.batch(k)  # this rank's rows
                for i in range(0, len(x), self.micro_batch_size):
                    xb, yb = x[i : i + self.micro_batch_size], y[i : i + self.micro_batch_size]
                    loss, count = self.stepper.eval_loss(xb, yb)
                    s, n = s + loss, n + count
        self.model.train()
        if self.dist.world > 1:
            s, n = self.dist.all_sum(torch.tensor([s, n], dtype=torch.float64, device=self.device)).tolist()
        if n == 0:
            raise GptlabError(
                "the validation batches hold no target tokens (every response is cut away)",
                "raise model.block_size or give shorter examples",
            )
        return s / n

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self._stop_requested:
            self._stop_signal = signum
        if self.dist.world > 1:  # torchrun passes the terminal's Ctrl-C on again: only its own timeout aborts
            self._stop_requested = True  # the ranks agree on the step to stop at, then rank 0 says so
            return
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise Interrupted(signum)
        self._stop_requested = True
        console.print("[yellow]interrupted: saving a checkpoint after this step (Ctrl-C again to abort)[/]")

    def fit(self) -> Trainer:
        """Train until the budget, or Ctrl-C/SIGTERM (a checkpoint saved, `interrupted` set); returns self."""
        t = self.cfg.train
        self.model.train()
        # Ctrl-C and SIGTERM (a scheduler's preemption) both save a checkpoint after the current step
        # (signal handlers can only be installed from the main thread)
        in_main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, signal.SIGTERM) if in_main else ()
        old_handlers = {sig: signal.signal(sig, self._on_sigint) for sig in signals}
        clean = False
        try:
            self.fire("on_train_start")
            self._loop(t)
            if self._stopping():  # also after the last step: the run's end (on_fit_end) is left to a resume
                self.interrupted = self._agreed_signal if self.dist.world > 1 else self._stop_signal
            else:  # the budget was spent or a callback stopped it: not an interruption
                self.fire("on_fit_end")
            clean = True
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory() from e
        except (RuntimeError, torch.distributed.DistError) as e:
            if self.dist.world > 1 and distributed.lost_peer(e):
                raise distributed.peer_error(e, t.dist_timeout) from e
            raise
        except OSError as e:  # metrics.jsonl, history.json, results.json on a full disk or a read-only folder
            if is_write_failure(e):
                raise write_error(e, e.filename or self.run_dir) from e
            raise
        finally:
            # a rank that failed keeps ignoring torchrun's SIGTERM, which would end it before it reports why
            if clean or self.dist.world == 1:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
            try:
                self._fire_end(clean)
            finally:  # also when a callback's last write failed
                if self._owns_group:  # the group this trainer joined is left with it
                    self._owns_group = False
                    # DDP's C++ reducer holds the group and frees it holding the GIL, which deadlocks against gloo's
                    # worker thread (seen: a hang after the last step, 1 run in 30): drop it while the group lives
                    self.stepper.module = self.stepper.forward = self.forward = None
                    gc.collect()
                    distributed.shutdown(clean)
        return self

    def _fire_end(self, clean: bool) -> None:
        """on_train_end for every callback, even after one fails (files closed, progress bar stopped).

        After a failed fit, a failure here is dropped: it must not mask the error that ended the fit. After a clean
        one the first is raised, a failed write as the user's error."""
        self.failed = not clean
        first: Exception | None = None
        for cb in self.callbacks:
            if self.dist.is_main or cb.all_ranks:
                try:
                    cb.on_train_end(self)
                except Exception as e:  # noqa: BLE001 - the others still clean up; raised below
                    first = first or e
        if first is not None and clean:
            if is_write_failure(first):
                raise write_error(first, getattr(first, "filename", None) or self.run_dir) from first
            raise first

    def out_of_memory(self) -> GptlabError:
        """The error for a step that ran out of device memory, naming the settings that would fit it."""
        return GptlabError(
            f"out of memory with micro-batches of {self.micro_batch_size} x {self.cfg.model.block_size} tokens",
            "lower train.micro_batch_size (the batch is kept by accumulation), model.block_size or the model size",
        )

    def _stopping(self) -> bool:
        """Whether Ctrl-C or SIGTERM asked to stop: on several ranks, once all of them know it."""
        return self._stop_requested if self.dist.world == 1 else self._stop_agreed

    def _share(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's loss from the ranks' shares, and whether any rank was asked to stop, in one all-reduce."""
        if self.dist.world == 1:
            return loss
        # one count per stop signal, so every rank also learns which one (SIGTERM, a preemption, wins)
        flags = [float(self._stop_requested and self._stop_signal == s) for s in (signal.SIGINT, signal.SIGTERM)]
        packed = torch.cat([loss.float().reshape(1), torch.tensor(flags, device=loss.device)])
        self.dist.all_sum(packed)
        self._stop_agreed = bool(packed[1:].sum() > 0)
        self._agreed_signal = signal.SIGTERM if packed[2] > 0 else signal.SIGINT
        return packed[0]

    def _pin(self, a: np.ndarray) -> np.ndarray | torch.Tensor:
        """Pinned host memory lets the copy to the GPU overlap compute; it runs in the prefetch thread."""
        return torch.from_numpy(a).pin_memory() if self.device.type == "cuda" else a

    def _loop(self, t: Any) -> None:
        batches = prefetch(self.train_batches, self.step, self.total_steps, self._pin)
        try:
            self._steps(t, batches)
        finally:
            batches.close()  # stops the reader thread

    def _steps(self, t: Any, batches: Iterator[tuple[Any, Any]]) -> None:
        while self.step < self.total_steps:
            if self.stop_reason is not None:
                if not self.quiet and self.dist.is_main:
                    console.print(f"stopped at step {self.step}: {self.stop_reason}")
                return
            if self._stopping() and self.step == 0:  # nothing trained: no optimizer state worth a checkpoint
                if self.dist.is_main:
                    console.print("[yellow]interrupted before the first step: nothing to save[/]")
                return
            if self._stopping():
                if self.dist.world > 1 and self.dist.is_main:
                    console.print(f"[yellow]interrupted: every rank saves a checkpoint at step {self.step}[/]")
                path = self.save_checkpoint()
                if self.dist.is_main:
                    console.print(f"saved {path}")
                return
            factor = lr_factor(self.step, self.total_steps, t, self.steps_per_epoch)
            self.stepper.set_lr(factor)
            t0 = time.perf_counter()
            with record_function("data"):  # regions train.profile reports: waiting for the batch vs computing
                x, y = next(batches)
            with record_function("step"):
                loss_t, norm_t = self.stepper(x, y)
                loss = float(self._share(loss_t))  # one sync per step: needed for the NaN guard and the log
            if not math.isfinite(loss):
                raise GptlabError(
                    f"loss is {loss} at step {self.step + 1}",
                    "lower train.lr or use train.dtype=float32; "
                    f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}",
                )
            self.step += 1
            dt = time.perf_counter() - t0
            self._epoch_loss += loss
            self._epoch_steps += 1
            self._interval_loss += loss
            self._interval_steps += 1
            epoch = (self.step - 1) // self.steps_per_epoch
            self.fire(
                "on_step",
                {
                    "step": self.step, "epoch": epoch, "loss": loss, "lr": t.lr * factor,
                    "grad_norm": float(norm_t), "tokens_per_s": self.tokens_per_step / dt,
                },
            )  # fmt: skip
            into_epoch = self.step % self.steps_per_epoch  # 0 at an epoch's end
            if into_epoch == 0 or self.step == self.total_steps:
                metrics = {
                    "epoch": epoch, "step": self.step, "lr": t.lr * factor,
                    "train_loss": self._epoch_loss / max(1, self._epoch_steps),
                }  # fmt: skip
                self._epoch_loss, self._epoch_steps = 0.0, 0
                self._interval_loss, self._interval_steps = 0.0, 0
                self.fire("on_epoch_end", metrics)
            elif self.eval_interval is not None and into_epoch % self.eval_interval == 0:
                # epoch mode's long epochs: an evaluation and a checkpoint every eval_interval steps into each one
                # (in random mode an epoch is eval_interval steps, so this never fires there)
                metrics = {
                    "epoch": epoch, "step": self.step, "lr": t.lr * factor, "mid_epoch": True,
                    "train_loss": self._interval_loss / max(1, self._interval_steps),
                }  # fmt: skip
                self._interval_loss, self._interval_steps = 0.0, 0
                self.fire("on_interval_end", metrics)
