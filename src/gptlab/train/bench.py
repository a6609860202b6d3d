"""`gptlab bench`: time forward + backward + optimizer step on synthetic batches, report MFU."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from gptlab.config import Config
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train.trainer import TrainStep, micro_batch_size, select_device

# dense bf16 tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name()
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}  # fmt: skip


def cpu_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this CPU: the honest peak to compare a CPU run against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Peak FLOP/s of the device for this dtype, and where the number comes from."""
    if device.type == "cpu":
        return cpu_matmul_peak(), "measured fp32 matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                # fp32 runs on TF32 tensor cores at about half the bf16 rate
                return (peak if dtype != torch.float32 else peak / 2), f"{key} datasheet"
    return None, "unknown device"


@dataclass
class BenchResult:
    """Timing of one configuration."""

    ms_per_iter: float
    tokens_per_s: float
    mfu: float | None
    peak_source: str
    params: int
    device: str
    dtype: str
    threads: int  # torch's CPU threads at the end (--threads N, or the count timing chose: gptlab/threads.py)

    def __str__(self) -> str:
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a"
        cpu = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.device == "cpu" else ""
        return (
            f"{self.params / 1e6:.2f}M params on {self.device} ({self.dtype}{cpu}): {self.ms_per_iter:.1f} ms/iter, "
            f"{self.tokens_per_s:,.0f} tokens/s, MFU {mfu} (peak: {self.peak_source})"
        )


def bench(cfg: Config, steps: int = 20, warmup: int = 5, vocab_size: int = 0) -> BenchResult:
    """Time `steps` training steps after `warmup` steps on random tokens of the config's shape."""
    if cfg.train.backend != "torch":
        raise GptlabError(
            f"gptlab bench times the PyTorch step, not train.backend={cfg.train.backend}",
            "drop train.backend; benchmarks/jax_speed.py compares the JAX step with it",
        )
    vocab = cfg.model.vocab_size or vocab_size or 256
    model_cfg = replace(cfg.model, vocab_size=vocab).resolved()
    device = select_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg).to(device)
    step = TrainStep(model, cfg.train, device, micro_batch_size(cfg.train, world=1))
    rng = np.random.default_rng(cfg.train.seed)
    shape = (cfg.train.batch_size, model_cfg.block_size)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x = rng.integers(0, vocab, size=shape)
            loss, _ = step(x, np.roll(x, -1, axis=1))
        float(loss)  # wait for the device
        return time.perf_counter() - t0

    if warmup:
        run(warmup)
    dt = run(steps) / steps
    tokens_per_s = shape[0] * shape[1] / dt
    peak, source = device_peak(device, step.dtype)
    mfu = model.flops_per_token(model_cfg.block_size) * tokens_per_s / peak if peak else None
    return BenchResult(
        1000 * dt, tokens_per_s, mfu, source, model.num_params(), str(device), str(step.dtype), step.threads.current
    )
