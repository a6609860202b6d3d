"""Synthetic tasks on CPU: the adder preset to its exact-match target, and sort as lists and vocabularies grow.

    .venv/bin/python benchmarks/tasks.py                 # the adder preset, then sort at three sizes
    .venv/bin/python benchmarks/tasks.py --only adder    # just the adder

Each row: epochs run (early stopping ends a run once valid exact match stops improving), the epoch of the best
checkpoint, wall time (prepare + train + the final test scoring), and exact match on the full valid and test
splits of the best checkpoint. Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from gptlab.config import load_config
from gptlab.data.tasks import prepare_task
from gptlab.train.trainer import Trainer

CONFIGS = Path(__file__).parent.parent / "configs"
RUNS = {  # name: (preset, overrides)
    "adder": ("adder.yaml", []),
    "sort 6 x 10": ("sort.yaml", []),
    "sort 12 x 10": ("sort.yaml", ["task.length=12", "model.block_size=26"]),
    "sort 6 x 36": ("sort.yaml", ["task.values=36"]),
}


def run(name: str, preset: str, overrides: list[str], root: Path) -> str:
    cfg = load_config(
        CONFIGS / preset,
        [f"data.dir={root / name / 'data'}", f"train.out_dir={root / name / 'run'}", "train.device=cpu", *overrides],
    )
    t0 = time.perf_counter()
    prepare_task(cfg.task, cfg.data.dir)
    trainer = Trainer(cfg, quiet=True).fit()
    wall = time.perf_counter() - t0
    r, history = trainer.results, trainer.history
    best = next(h["epoch"] for h in history if f"step_{h['step']}" == r["checkpoint"])
    return (
        f"| {name} | {' '.join(overrides) or '-'} | {len(history)} | {best + 1} | {wall:.0f} s | "
        f"{r['val_exact_match']:.4f} | {r['test_exact_match']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these (repeatable)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| run | overrides | epochs run | best epoch | wall | valid exact match | test exact match |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or RUNS:
            preset, overrides = RUNS[name]
            print(run(name, preset, overrides, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
