"""The default recipe (Muon) against the same model with AdamW at equal wall-clock time, per CPU class.

A Muon step costs more than an AdamW step (its Newton-Schulz matmuls), so "Muon wins at 2000 steps" does not say
it wins for a user who trains for a fixed time. This benchmark answers that on the machine it runs on:

1. Step cost: train_speed.py's `optimizer_ratio`: configs/shakespeare-char.yaml's training step (`TrainStep`,
   compiled as the trainer compiles a 2000-step run, the thread count as `gptlab train` picks it) with
   train.optimizer=muon and =adamw, timed in interleaved rounds in one process; the median over rounds of Muon
   time / AdamW time.
2. Quality: AdamW trains quality.py's budget (nanoGPT's CPU budget: 2000 steps, tiny shakespeare); Muon trains
   round(2000 / ratio) steps, what it does in the same time (its schedule fitted to that length). Val loss as
   quality.py measures it, two seeds each.

CPU classes: the machine as it is, and with --no-bf16 a CPU without native bf16 matmuls (AVX2: most laptops,
AMD before Zen 4), emulated on an AVX-512 machine by limiting oneDNN and MKL to AVX2 in the timing process
(ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2): bf16 matmuls then take torch's emulated path, as on
such a CPU, and train.muon_precision=auto picks fp32. Training for the loss runs without the limits (the
numbers do not depend on them) with the precision the class's auto picks.

    .venv/bin/python benchmarks/equal_time.py               # this CPU as it is
    .venv/bin/python benchmarks/equal_time.py --no-bf16     # a CPU without native bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import DEFAULT_DATA, ITERS, prepare_data, run_one, val_tokens  # noqa: E402
from train_speed import NO_BF16_ENV  # noqa: E402

from gptlab.train.muon import muon_dtype  # noqa: E402


def timing(no_bf16: bool, rounds: int, steps: int) -> dict:
    """train_speed.optimizer_ratio in a fresh process, limited to AVX2 for --no-bf16 (limits apply at start-up)."""
    code = f"import json, train_speed; print(json.dumps(train_speed.optimizer_ratio({rounds}, {steps})))"
    env = {**os.environ, **(NO_BF16_ENV if no_bf16 else {})}
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train(job: tuple) -> dict:
    """One run of quality.py's budget (one thread, as quality.py), in a worker process."""
    name, seed, overrides, source, data_dir, work = job
    torch.set_num_threads(1)
    val = val_tokens(Path(data_dir))
    run_work = Path(work) / name
    run_work.mkdir(parents=True, exist_ok=True)
    r = run_one("gptlab", seed, Path(source), Path(data_dir), run_work, overrides, val)
    return {**r, "recipe": name}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--no-bf16", action="store_true", help="emulate a CPU without native bf16 matmuls (AVX2)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"tiny shakespeare (default {DEFAULT_DATA})")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=20, help="steps per side per round")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--iters", type=int, default=ITERS, help="AdamW's steps (quality.py's budget: 2000)")
    p.add_argument("--ratio", type=float, help="skip the timing: Muon / AdamW step time measured earlier")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    t0 = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}", flush=True)
    t = timing(args.no_bf16, args.rounds, args.steps) if args.ratio is None else {"ratio": args.ratio}
    print(f"step cost: {json.dumps(t)}", flush=True)
    ratio = t["ratio"]
    muon_steps = round(args.iters / ratio)
    precision = "float32" if args.no_bf16 else str(muon_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    recipes = {
        "adamw": ["train.optimizer=adamw", f"train.max_iters={args.iters}"],
        "muon": [f"train.max_iters={muon_steps}", f"train.muon_precision={precision}"],
    }
    with tempfile.TemporaryDirectory(prefix="gptlab-equal-time-") as work:
        source = Path(args.data).resolve()
        data_dir = prepare_data(source, Path(work) / "data")
        jobs = [(name, s, over, str(source), str(data_dir), work) for name, over in recipes.items() for s in seeds]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(train, jobs))
    print()
    print(f"| recipe | steps in AdamW's {args.iters}-step time | {' | '.join(f'seed {s}' for s in seeds)} | mean |")
    print("|---" * (len(seeds) + 3) + "|")
    means = {}
    for name in recipes:
        rs = [r for r in results if r["recipe"] == name]
        means[name] = statistics.mean(r["val_loss"] for r in rs)
        steps = args.iters if name == "adamw" else muon_steps
        label = "AdamW (lr 2e-3)" if name == "adamw" else f"Muon ({precision} Newton-Schulz)"
        losses = " | ".join(f"{r['val_loss']:.4f}" for r in rs)
        print(f"| {label} | {steps} | {losses} | {means[name]:.4f} |")
    winner = min(means, key=means.get)
    print(f"\nat equal time the winner is {winner} ({means[winner]:.4f} against {max(means.values()):.4f}); "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"timing": t, "muon_steps": muon_steps, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
