"""Training speed: gptlab's train step against a plain PyTorch loop on Hugging Face GPT-2, same shape.

gptlab side: `GPT(ModelConfig(arch="gpt2"))` through `TrainStep` with `TrainConfig(optimizer="adamw",
dtype="float32", grad_clip=1.0)` and gptlab's run-time defaults: compile and fused AdamW as `TrainStep`
picks them (with TrainConfig's default budget of 5000 steps its auto rule compiles on CPU).
Reference: `transformers.GPT2LMHeadModel` (sdpa attention, dropout 0) with unfused `torch.optim.AdamW`,
cross-entropy, `clip_grad_norm_(1.0)` and `zero_grad`. Both sides see the same random batches of a
65-token vocabulary (tiny-shakespeare chars).

After warm-up (compilation included), each round times N steps of both sides, alternating which goes
first; the reported ratio is the median over rounds of HF time / gptlab time (>1: gptlab is faster).
Ratios from interleaved rounds survive a shared, noisy machine better than absolute times; short rounds
make it likely that both halves of a round see the same load. "best rounds" (fastest HF round / fastest
gptlab round) is a cross-check that bursts of other work, which only add time, barely move.

The default recipe's step (configs/shakespeare-char.yaml: Muon on hidden matrices) is also timed against the
same model with AdamW (`optimizer_ratio`, goal: Muon's step at most 2x AdamW's). Muon's Newton-Schulz runs in bf16
where the CPU has native bf16 matmuls and in fp32 elsewhere (train/muon.py); to measure a CPU without them
(AVX2) on an AVX-512 machine, limit oneDNN and MKL to AVX2 at start-up (NO_BF16_ENV), as the last line shows.

    python benchmarks/train_speed.py                      # full run, as recorded in RESULTS.md
    python benchmarks/train_speed.py --rounds 3 --steps 3 --warmup 2 --shapes small   # a quick look
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/train_speed.py --shapes none
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab.config import ModelConfig, TrainConfig, load_config
from gptlab.model import GPT
from gptlab.train.muon import muon_dtype
from gptlab.train.trainer import TrainStep

VOCAB = 65  # tiny-shakespeare characters
# a CPU without native bf16 matmuls (AVX2), emulated on an AVX-512 one: oneDNN and MKL limited at start-up
NO_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    goal: float  # HF time / gptlab time to reach

    @property
    def tokens(self) -> int:
        return self.batch_size * self.block_size


SHAPES = {
    "small": Shape("small", 4, 4, 128, 64, 12, goal=1.5),
    "larger": Shape("larger", 6, 6, 384, 256, 8, goal=1.25),
}


class Batches:
    """A fixed pool of random (inputs, targets) batches, cycled; the same pool for every side."""

    def __init__(self, shape: Shape, n: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        seqs = rng.integers(0, VOCAB, size=(n, shape.batch_size, shape.block_size + 1))
        self.pool = [(s[:, :-1].copy(), s[:, 1:].copy()) for s in seqs]
        self.i = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def gptlab_step(
    shape: Shape, compile: bool | None, cfg: TrainConfig | None = None, model_cfg: ModelConfig | None = None
):
    """gptlab's step as the trainer runs it: GPT + TrainStep with the CPU defaults (compile=None: auto)."""
    model_cfg = model_cfg or ModelConfig(
        arch="gpt2", vocab_size=VOCAB, block_size=shape.block_size, n_layer=shape.n_layer,
        n_head=shape.n_head, n_embd=shape.n_embd, dropout=0.0,
    )  # fmt: skip
    cfg = cfg or TrainConfig(optimizer="adamw", dtype="float32", grad_clip=1.0)
    cfg = replace(cfg, device="cpu", batch_size=shape.batch_size, compile=compile)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    model.train()
    step = TrainStep(model, cfg, torch.device("cpu"), shape.batch_size)

    def run(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        return step(x, y)[0]

    compiled = step.forward is not model
    fused = all(g.get("fused") for opt in step.optimizers for g in opt.param_groups if "fused" in g)
    params = sum(p.numel() for p in model.parameters())
    return run, {"compiled": compiled, "fused_adamw": fused, "params": params}


def hf_step(shape: Shape):
    """The reference: a plain PyTorch loop on transformers' GPT-2 with the same shape."""
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=shape.block_size, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=False)

    def run(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        logits = model(input_ids=torch.from_numpy(x)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run, {"params": sum(p.numel() for p in model.parameters())}


def timed(run, batches: Batches, steps: int) -> float:
    """Seconds for `steps` steps (the loss is read back each step, as the trainer does)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        float(run(*batches.next()))
    return time.perf_counter() - t0


def warm_up(run, batches: Batches, steps: int) -> float:
    """Run warm-up steps; returns the first step's seconds (compilation, if any, happens there)."""
    t0 = time.perf_counter()
    float(run(*batches.next()))
    first = time.perf_counter() - t0
    timed(run, batches, max(0, steps - 1))
    return first


def compare(shape: Shape, args: argparse.Namespace) -> dict:
    """Interleaved rounds of gptlab and HF on one shape."""
    sides = {"gptlab": gptlab_step(shape, args.compile), "hf": hf_step(shape)}
    # the same model on both sides: same parameter count (tied embeddings, biases, learned positions)
    assert sides["gptlab"][1]["params"] == sides["hf"][1]["params"], {k: v[1]["params"] for k, v in sides.items()}
    runs = {name: run for name, (run, _) in sides.items()}
    batches = {name: Batches(shape) for name in runs}
    first = {name: warm_up(run, batches[name], args.warmup) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = ["gptlab", "hf"] if r % 2 == 0 else ["hf", "gptlab"]
        for name in order:
            times[name].append(timed(runs[name], batches[name], args.steps) / args.steps)
        print(
            f"  {shape.name} round {r + 1}/{args.rounds}: gptlab {1000 * times['gptlab'][-1]:.1f} ms/step, "
            f"HF {1000 * times['hf'][-1]:.1f} ms/step, ratio {times['hf'][-1] / times['gptlab'][-1]:.2f}",
            flush=True,
        )
    ratios = [h / g for h, g in zip(times["hf"], times["gptlab"])]
    gptlab_ms = 1000 * statistics.median(times["gptlab"])
    return {
        "shape": shape,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "best_ratio": min(times["hf"]) / min(times["gptlab"]),  # interference only adds time: a cross-check
        "gptlab_ms": gptlab_ms,
        "hf_ms": 1000 * statistics.median(times["hf"]),
        "first_step_s": first["gptlab"],
        "compile_s": first["gptlab"] - gptlab_ms / 1000,
        **sides["gptlab"][1],
    }


def default_recipe(args: argparse.Namespace) -> dict:
    """Tokens/s of gptlab's default recipe (configs/shakespeare-char.yaml: arch modern, Muon) at the small shape."""
    cfg = load_config(ROOT / "configs" / "shakespeare-char.yaml")
    model_cfg = replace(cfg.model, vocab_size=VOCAB)
    shape = Shape("default recipe", model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd,
                  model_cfg.block_size, cfg.train.batch_size, goal=0.0)  # fmt: skip
    run, info = gptlab_step(shape, args.compile, cfg.train, model_cfg)
    batches = Batches(shape)
    first = warm_up(run, batches, args.warmup)
    per_step = statistics.median(timed(run, batches, args.steps) / args.steps for _ in range(args.rounds))
    return {"shape": shape, "tokens_per_s": shape.tokens / per_step, "ms": 1000 * per_step,
            "first_step_s": first, **info}  # fmt: skip


def cpu_class() -> dict:
    """The CPU's name, its vector extensions, and the start-up limits put on oneDNN and MKL."""
    caps = torch._C._cpu._get_cpu_capability()
    exts = [e for e in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(e)]
    limits = {k: os.environ[k] for k in NO_BF16_ENV if k in os.environ}
    return {"cpu": caps.get("cpu_name", "?"), "extensions": exts, "limits": limits}


def optimizer_ratio(rounds: int, steps: int, warmup: int = 10, precision: str = "auto") -> dict:
    """The default recipe's step (Muon) against the same model with AdamW: median Muon / AdamW time over
    interleaved rounds, each compiled as the trainer compiles a 2000-step run."""
    cfg = load_config(ROOT / "configs" / "shakespeare-char.yaml")
    model_cfg = replace(cfg.model, vocab_size=VOCAB)
    shape = Shape("default recipe", model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd,
                  model_cfg.block_size, cfg.train.batch_size, goal=0.0)  # fmt: skip
    train = replace(cfg.train, max_iters=2000, muon_precision=precision)
    runs = {opt: gptlab_step(shape, None, replace(train, optimizer=opt), model_cfg)[0] for opt in ("adamw", "muon")}
    batches = {name: Batches(shape) for name in runs}
    for name, run in runs.items():
        warm_up(run, batches[name], warmup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in ("adamw", "muon") if r % 2 == 0 else ("muon", "adamw"):
            times[name].append(timed(runs[name], batches[name], steps) / steps)
    ratios = [m / a for m, a in zip(times["muon"], times["adamw"])]
    return {"ratio": statistics.median(ratios), "range": (min(ratios), max(ratios)),
            "adamw_ms": 1000 * statistics.median(times["adamw"]), "muon_ms": 1000 * statistics.median(times["muon"]),
            "threads": torch.get_num_threads(), **cpu_class(),
            "muon_precision": str(muon_dtype(precision, torch.device("cpu"))).removeprefix("torch.")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds per shape (>= 3)")
    p.add_argument("--steps", type=int, default=12, help="steps per side per round (the larger shape uses steps/4)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per side, compilation included")
    p.add_argument("--shapes", default="small,larger", help="comma-separated: small, larger (or none)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="gptlab's train.compile: auto = TrainStep's default for the device")  # fmt: skip
    p.add_argument("--no-recipe", action="store_true", help="skip the default recipe's tokens/s and Muon / AdamW")
    p.add_argument(
        "--muon-precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="train.muon_precision for Muon / AdamW (bfloat16: in torch.optim.Muon's precision)",
    )
    args = p.parse_args()
    if args.rounds < 3:
        p.error("--rounds must be at least 3 for a median of per-round ratios")
    args.compile = {"auto": None, "on": True, "off": False}[args.compile]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, compile={'auto' if args.compile is None else args.compile}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    results = []
    for name in [n for n in args.shapes.split(",") if n.strip() != "none"]:
        shape = SHAPES[name.strip()]
        steps = args.steps if shape.name == "small" else max(1, args.steps // 4)
        results.append(compare(shape, argparse.Namespace(**{**vars(args), "steps": steps})))
    recipe = None if args.no_recipe else default_recipe(args)
    optimizers = None if args.no_recipe else optimizer_ratio(args.rounds, args.steps, precision=args.muon_precision)

    print()
    print(
        "| shape | gptlab ms/step | HF ms/step | HF / gptlab (median, range) | best rounds | goal | gptlab tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = r["shape"]
        desc = (
            f"{s.name}: {s.n_layer} layers, {s.n_head} heads, {s.n_embd} dims, ctx {s.block_size}, batch {s.batch_size}"
        )
        ok = "met" if r["ratio"] >= s.goal else "NOT met"
        tokens_per_s = 1000 * s.tokens / r["gptlab_ms"]
        print(
            f"| {desc} | {r['gptlab_ms']:.1f} | {r['hf_ms']:.1f} | **{r['ratio']:.2f}x** "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['best_ratio']:.2f}x | {s.goal}x ({ok}) "
            f"| {tokens_per_s:,.0f} |"
        )
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine inflates both sides' times)")
    for r in results:
        print(
            f"{r['shape'].name}: {r['params']:,} parameters, gptlab compiled={r['compiled']}, "
            f"fused AdamW={r['fused_adamw']}, "
            f"first step {r['first_step_s']:.1f} s (compile and warm-up: ~{r['compile_s']:.1f} s)"
        )
    if recipe:
        print(
            f"default recipe (configs/shakespeare-char.yaml: modern, muon; small shape): "
            f"{recipe['tokens_per_s']:,.0f} tokens/s ({recipe['ms']:.1f} ms/step), compiled={recipe['compiled']}, "
            f"first step {recipe['first_step_s']:.1f} s"
        )
    if optimizers:
        o = optimizers
        ok = "met" if o["ratio"] <= 2.0 else "NOT met"
        print(
            f"default recipe's step with Muon / with AdamW: **{o['ratio']:.2f}x** ({o['range'][0]:.2f}-"
            f"{o['range'][1]:.2f}; {o['muon_ms']:.1f} / {o['adamw_ms']:.1f} ms), goal <= 2x ({ok}); CPU "
            f"{o['cpu']}, {'/'.join(o['extensions'])}, Muon's Newton-Schulz in {o['muon_precision']}"
            + (f", limited by {o['limits']}" if o["limits"] else "")
        )


if __name__ == "__main__":
    main()
