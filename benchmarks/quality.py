"""Model quality at a fixed training budget: val loss of nanoGPT's recipe vs gptlab's default recipe.

The budget is nanoGPT's CPU setting: context 64, batch 12, 4 layers, 4 heads, 128 dims, 2000 iterations,
dropout 0, on tiny shakespeare. The vocabulary is the sorted characters of the whole file; the first 90% of
characters are train (int(0.9 * n), as nanoGPT's prepare.py), the last 10% val.

Recipes (each trained with every seed; the mean over seeds is compared with the target):
- nanogpt: model.arch=gpt2, AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, warmup 100, cosine to 1e-4,
  grad clip 1.0. Target: mean val loss <= 1.92.
- gptlab: configs/shakespeare-char.yaml as it is, with only the data paths, out_dir, seed and eval interval
  overridden. Target: mean val loss <= 1.60.

Val loss is computed from the saved weights (`load_run(run_dir, "latest")`) in fp32, eval mode, as the mean
over 200 batches of 12 x 64 windows drawn with `torch.Generator().manual_seed(1234)`, the same for every run.

The data is prepared by `gptlab prepare` (its tail split keeps int(0.9 * n) characters for train, as nanoGPT).

    .venv/bin/python benchmarks/quality.py                       # both recipes, seeds 1 and 2
    .venv/bin/python benchmarks/quality.py --recipes gptlab --seeds 1 --set train.muon_lr=0.01
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptlab.config import DataConfig, load_config
from gptlab.data.batches import load_prepared
from gptlab.data.shards import prepare
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "shakespeare-char.yaml"
DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"

BLOCK, BATCH, ITERS = 64, 12, 2000
EVAL_BATCHES, EVAL_SEED = 200, 1234
EVAL_INTERVAL = 250  # evaluations during training (20 batches each) only log; the batch stream depends on it

BUDGET = [
    f"model.block_size={BLOCK}", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
    f"train.batch_size={BATCH}", f"train.max_iters={ITERS}", "train.max_tokens=null", "train.max_epochs=null",
]  # fmt: skip
NANOGPT = BUDGET + [
    "model.arch=gpt2", "train.optimizer=adamw", "train.lr=1e-3", "train.beta1=0.9", "train.beta2=0.99",
    "train.weight_decay=0.1", "train.schedule=cosine", "train.warmup_iters=100", "train.min_lr_ratio=0.1",
    "train.grad_clip=1.0", "train.data_mode=random", "train.dtype=float32",
]  # fmt: skip
RECIPES = {
    # name: (config file, overrides, target mean val loss)
    "nanogpt": (None, NANOGPT, 1.92),
    "gptlab": (PRESET, [], 1.60),
}


def prepare_data(source: Path, out: Path) -> Path:
    """`gptlab prepare` of `source`: sorted-character vocabulary, first int(0.9 n) characters train."""
    prepare(DataConfig(source=str(source), dir=str(out), val_fraction=0.1), overwrite=True, quiet=True)
    return out


def val_tokens(data_dir: Path) -> torch.Tensor:
    """The prepared folder's val split, its shards joined, as int64."""
    return torch.from_numpy(np.concatenate(load_prepared(data_dir).val).astype(np.int64))


@torch.no_grad()
def val_loss(run_dir: Path, val: torch.Tensor) -> float:
    """Mean loss of the run's latest weights over EVAL_BATCHES fixed random val batches (fp32, eval mode)."""
    _, model, _ = load_run(run_dir, "latest")
    model = model.float().eval()
    g = torch.Generator().manual_seed(EVAL_SEED)
    losses = []
    for _ in range(EVAL_BATCHES):
        ix = torch.randint(len(val) - BLOCK, (BATCH,), generator=g)
        x = torch.stack([val[i : i + BLOCK] for i in ix])
        y = torch.stack([val[i + 1 : i + 1 + BLOCK] for i in ix])
        logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def run_one(
    recipe: str, seed: int, source: Path, data_dir: Path, work: Path, extra: list[str], val: torch.Tensor
) -> dict:
    path, overrides, _ = RECIPES[recipe]
    run_dir = work / f"{recipe}-seed{seed}"
    overrides = overrides + [
        f"data.source={source}", f"data.dir={data_dir}", f"train.out_dir={run_dir}",
        f"train.seed={seed}", f"train.eval_interval={EVAL_INTERVAL}",
    ] + extra  # fmt: skip
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    Trainer(cfg, overwrite=True, quiet=True).fit()
    wall = time.perf_counter() - t0
    loss = val_loss(run_dir, val)
    return {"recipe": recipe, "seed": seed, "val_loss": loss, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"tiny shakespeare text file (default {DEFAULT_DATA})")
    p.add_argument("--recipes", default="nanogpt,gptlab", help="comma-separated: " + ", ".join(RECIPES))
    p.add_argument("--seeds", default="1,2", help="comma-separated train.seed values (default 1,2)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="extra override for every recipe, e.g. train.muon_lr=0.01 (for tuning; repeatable)",
    )  # fmt: skip
    p.add_argument("--work-dir", help="where data and runs go (default: a temporary folder, removed after)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on the shared 2-core machine two threads were 2-4x slower per step)",
    )  # fmt: skip
    p.add_argument("--json", help="also write the per-run results to this JSON file")
    args = p.parse_args(argv)

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="gptlab-quality-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        source = Path(args.data).resolve()
        data_dir = prepare_data(source, work / "data")
        meta = json.loads((data_dir / "meta.json").read_text())
        val = val_tokens(data_dir)
        print(
            f"data: {source}: vocab {meta['vocab_size']}, train {meta['train_tokens']} / val {meta['val_tokens']} "
            f"tokens; torch {torch.__version__}, {torch.get_num_threads()} threads",
            flush=True,
        )
        if args.set:
            print("extra overrides: " + " ".join(args.set), flush=True)
        results = []
        for recipe in recipes:
            for seed in seeds:
                r = run_one(recipe, seed, source, data_dir, work, args.set, val)
                results.append(r)
                print(f"  {recipe} seed {seed}: val loss {r['val_loss']:.4f}  ({r['wall_s']:.0f} s)", flush=True)

    print()
    cols = " | ".join(f"seed {s}" for s in seeds)
    print(f"| recipe | {cols} | mean | target | wall time per run |")
    print("|---" * (len(seeds) + 4) + "|")
    missed = False
    for recipe in recipes:
        rs = [r for r in results if r["recipe"] == recipe]
        mean = statistics.mean(r["val_loss"] for r in rs)
        target = RECIPES[recipe][2]
        ok = mean <= target
        missed |= not ok
        wall = statistics.mean(r["wall_s"] for r in rs)
        losses = " | ".join(f"{r['val_loss']:.4f}" for r in rs)
        print(f"| {recipe} | {losses} | {mean:.4f} | <= {target:.2f} {'met' if ok else 'MISSED'} | {wall:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
