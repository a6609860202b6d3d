"""Distributed training, measured: ranks against one process on the same global batches, and what activation
checkpointing trades.

    .venv/bin/python benchmarks/distributed.py            # CPU: 1 rank, 2 DDP ranks, 2 FSDP2 ranks (gloo)
    .venv/bin/python benchmarks/distributed.py --gpu      # on a CUDA machine: 1 GPU against the CPU, GPT-2 124M MFU

CPU part: tiny Shakespeare (../shared/data), char tokens, 4 layers x 128 dims, context 128, global batch 16, 100
steps, dropout 0, fp32, run with `gptlab train` (`--nproc 2` for the ranks). Each row: the largest loss
difference from the 1-rank run over all steps, and tokens/s (median of steps 11-100 from metrics.jsonl) relative to
1 rank. The 1-rank run uses both cores; each of 2 ranks one core, so the ratio shows what the ranks' communication
and duplicated work cost, not a speed-up (that needs more devices than this machine has).

Activation memory: peak resident memory of one forward + backward of the GPT-2 124M shape (context 1024, 1
sequence) minus the memory before it, in a fresh process each, with and without `train.activation_checkpointing`,
and the time of that step (the fastest of three).

GPU part (--gpu): the same model, init and batches for 5 steps on the GPU (fp32, TF32 off) and on the CPU, the
largest loss difference; then `gptlab bench` of configs/gpt2-124m.yaml in bf16 with and without torch.compile
(ms/iter, tokens/s, MFU against the H100/H200 bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parent.parent
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPE = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "model.dropout=0.0",
    "train.batch_size=16", "train.max_iters=100", "train.eval_interval=50", "train.eval_iters=4",
    "train.warmup_iters=10", "train.device=cpu", "train.dtype=float32", "train.compile=false",
]  # fmt: skip
RUNS = {  # name: (ranks, overrides)
    "1 rank": (1, []),
    "2 ranks, DDP": (2, []),
    "2 ranks, FSDP2": (2, ["train.parallel=fsdp"]),
    "2 ranks, DDP + activation checkpointing": (2, ["train.activation_checkpointing=true"]),
}


def gptlab(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "gptlab", *args, "--quiet"], check=True, env=env)


def losses_and_speed(run: Path) -> tuple[list[float], float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return [r["loss"] for r in steps], statistics.median(r["tokens_per_s"] for r in steps[10:])


def cpu_ranks(root: Path) -> list[str]:
    common = [f"data.source={DATA}", f"data.dir={root / 'data'}", "data.tokenizer=char", *SHAPE]
    gptlab("prepare", *common, threads=2)
    results = {}
    for name, (ranks, extra) in RUNS.items():
        run = root / name.replace(" ", "_").replace(",", "").replace("+", "")
        nproc = ["--nproc", "2"] if ranks > 1 else []
        t0 = time.perf_counter()
        gptlab("train", *common, *extra, f"train.out_dir={run}", *nproc, threads=2 // ranks)
        results[name] = (*losses_and_speed(run), time.perf_counter() - t0)
    ref_losses, ref_speed, _ = results["1 rank"]
    rows = ["| run | max loss diff from 1 rank (100 steps) | final loss | tokens/s | vs 1 rank | wall s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (losses, speed, wall) in results.items():
        diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        ratio = speed / ref_speed
        rows.append(f"| {name} | {diff:.1e} | {losses[-1]:.4f} | {speed:,.0f} | {ratio:.2f}x | {wall:.0f} |")
    return rows


MEMORY_PROBE = """
import resource, sys, time, torch
from gptlab.config import load_config
from gptlab.model import GPT
cfg = load_config(sys.argv[1], ["model.vocab_size=50304", "model.dropout=0.0"]).model
torch.manual_seed(0)
model = GPT(cfg)
model.checkpoint_blocks = sys.argv[2] == "on"
x = torch.randint(0, 50304, (1, cfg.block_size))
model(x[:, :8]).float().mean().backward()  # allocate gradients and warm up first
model.zero_grad(set_to_none=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = []
for _ in range(3):  # the high-water mark is the first one's; the time the fastest of three
    t0 = time.perf_counter()
    model(x).float().logsumexp(-1).mean().backward()
    seconds.append(time.perf_counter() - t0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, min(seconds))
"""


def activation_memory() -> list[str]:
    rows = ["| activation checkpointing | peak memory added by forward + backward (MiB) | seconds |", "|---|---|---|"]
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(ROOT / "configs" / "gpt2-124m.yaml"), mode],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        rows.append(f"| {mode} | {float(out[0]):,.0f} | {float(out[1]):.2f} |")
    return rows


def gpu() -> list[str]:
    import numpy as np

    from gptlab.config import load_config
    from gptlab.model import GPT
    from gptlab.train.bench import bench
    from gptlab.train.trainer import TrainStep

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fp32 = ["train.dtype=float32", "train.compile=false", "model.vocab_size=50304", "model.dropout=0.0"]
    cfg = load_config(ROOT / "configs" / "gpt2-124m.yaml", fp32)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 50304, size=(4, 256)) for _ in range(5)]
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = GPT(cfg.model).to(device)
        step = TrainStep(model, cfg.train, torch.device(device), 4)
        losses[device] = [float(step(x[:, :-1], x[:, 1:])[0]) for x in batches]
    diff = max(abs(a - b) for a, b in zip(losses["cpu"], losses["cuda"]))
    rows = [f"1 GPU against the CPU, GPT-2 124M fp32, 5 steps of 4 x 255 tokens: max loss diff {diff:.1e}", "",
            "| torch.compile | ms/iter | tokens/s | MFU |", "|---|---|---|---|"]  # fmt: skip
    for compiled in ("false", "true"):
        bf16 = ["train.device=cuda", "train.dtype=bfloat16", f"train.compile={compiled}"]
        r = bench(load_config(ROOT / "configs" / "gpt2-124m.yaml", bf16), steps=10, warmup=3, vocab_size=50304)
        rows.append(f"| {compiled} | {r.ms_per_iter:.1f} | {r.tokens_per_s:,.0f} | {100 * (r.mfu or 0):.1f}% |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU part (needs CUDA)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.gpu:
        print("\n".join(gpu()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(cpu_ranks(Path(tmp))))
    print()
    print("\n".join(activation_memory()))


if __name__ == "__main__":
    main()
