"""JAX backend against PyTorch on the CPU: greedy generation and the training step, in one run, as ratios.

The model: `GPT(ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))` with seeded random
weights (arch "modern" and "gpt2"), fp32. Both sides start from the same weights: the JAX side converts the PyTorch
model (`gptlab.jax.model.from_torch`).

Generation: `gptlab.generate.Generator.generate` against `gptlab.jax.generate.JaxGenerator.generate`, 16-token
prompts, 200 new tokens, temperature 0, batch 1 and 8. The tokens are checked identical. JAX's first call compiles
(prefill once per batch size and prompt bucket, decode once per batch size): its time is reported apart, then warm
calls are timed.

Training: `gptlab.train.trainer.TrainStep` with TrainConfig(compile=False) (eager, the ratios' base) and, unless
`--no-torch-compile`, with TrainConfig(compile=True), against `gptlab.jax.train.JaxTrainStep` (a jitted optax AdamW
step); AdamW lr 1e-3, grad clip 1.0, the same random batches. The first 3 losses of every side are printed and
checked to agree (same init, same batches). The loss is read back every step, as the trainer does, so JAX's
asynchronous dispatch is timed in full.

Timing as in the other benchmarks: after warm-up, interleaved rounds with the order of the sides rotating; the ratio
is the median over rounds of (PyTorch time / JAX time), i.e. JAX's speed over PyTorch's (>1: JAX is faster), with
the rounds' range. Ratios survive a shared, noisy machine better than absolute times.

    python benchmarks/jax_speed.py            # as recorded in RESULTS.md (a few minutes on 2 cores)
    python benchmarks/jax_speed.py --quick    # a quick look: modern arch, fewer rounds, one training shape, eager
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from gptlab.config import ModelConfig, TrainConfig
from gptlab.generate import Generator
from gptlab.model import GPT
from gptlab.train.trainer import TrainStep

VOCAB, PROMPT, NEW = 65, 16, 200
SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
LOSS_STEPS = 3  # the first steps whose losses are compared across sides


def build_model(arch: str) -> GPT:
    """The benchmark's model with seeded random weights, fp32, dropout 0."""
    torch.manual_seed(0)
    return GPT(ModelConfig(arch=arch, vocab_size=VOCAB, dropout=0.0, **SHAPE))


def rounds(sides: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Seconds of each side in n rounds, the order rotating from round to round."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratios(times: dict[str, list[float]], base: str, side: str) -> list[float]:
    """Per-round base time / side time: the side's speed relative to the base (>1: the side is faster)."""
    return [b / s for b, s in zip(times[base], times[side], strict=True)]


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


# ----- generation ---------------------------------------------------------------------------------------------------
def bench_generation(arch: str, batches: list[int], n_rounds: int) -> list[dict]:
    import jax

    from gptlab.jax.generate import JaxGenerator
    from gptlab.jax.model import from_torch

    model = build_model(arch).eval()
    torch_gen = Generator(model)
    jax_gen = JaxGenerator(from_torch(model), model.cfg)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, VOCAB, (batch, PROMPT), generator=g).tolist()
        sides = {
            "torch": functools.partial(torch_gen.generate, prompts, NEW, temperature=0),
            "jax": functools.partial(jax_gen.generate, prompts, NEW, temperature=0),
        }
        traces = dict(jax_gen.traces)
        t0 = time.perf_counter()
        jax_tokens = sides["jax"]()  # compiles prefill and decode for this batch size
        jax_first = time.perf_counter() - t0
        compiled = {k: v - traces.get(k, 0) for k, v in jax_gen.traces.items()}
        t0 = time.perf_counter()
        torch_tokens = sides["torch"]()
        torch_first = time.perf_counter() - t0
        same = jax_tokens == torch_tokens
        assert same, f"{arch}, batch {batch}: JAX and PyTorch greedy tokens differ"
        assert all(len(t) == NEW for t in jax_tokens)
        traces = dict(jax_gen.traces)
        times = rounds(sides, n_rounds)
        assert dict(jax_gen.traces) == traces, f"JAX recompiled while timed: {traces} -> {dict(jax_gen.traces)}"
        r = ratios(times, "torch", "jax")
        speed = {k: batch * NEW / statistics.median(v) for k, v in times.items()}
        row = {
            "arch": arch,
            "batch": batch,
            "torch": speed["torch"],
            "jax": speed["jax"],
            "ratio": statistics.median(r),
            "span": span(r),
            "jax_first": jax_first,
            "jax_compile": jax_first - statistics.median(times["jax"]),
            "torch_first": torch_first,
            "compiled": compiled,
            "same": same,
        }
        rows.append(row)
        print(
            f"generate {arch:>6}, batch {batch}: PyTorch {speed['torch']:,.0f} tok/s, JAX {speed['jax']:,.0f} tok/s, "
            f"JAX/PyTorch {row['ratio']:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in r)}); JAX first call "
            f"{jax_first:.2f} s (compiled {compiled}, ~{row['jax_compile']:.2f} s over a warm call), PyTorch first "
            f"call {torch_first:.2f} s; same greedy tokens: {same}; no recompiles while timed",
            flush=True,
        )
    jax.clear_caches()
    return rows


# ----- training -----------------------------------------------------------------------------------------------------
class Batches:
    """A fixed pool of random (inputs, targets) batches, cycled; each side gets its own copy, in the same order."""

    def __init__(self, batch_size: int, block_size: int, n: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        seqs = rng.integers(0, VOCAB, size=(n, batch_size, block_size + 1))
        self.pool = [(s[:, :-1].copy(), s[:, 1:].copy()) for s in seqs]
        self.i = -1

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def bench_training(arch: str, batch_size: int, block_size: int, args: argparse.Namespace) -> dict:
    import jax

    from gptlab.jax.train import JaxTrainStep

    model = build_model(arch)
    cfg = TrainConfig(device="cpu", dtype="float32", compile=False, batch_size=batch_size)
    # every side gets its own copy of the same initial weights, before any step changes them
    steppers: dict[str, object] = {"jax": JaxTrainStep(copy.deepcopy(model), cfg, jax.devices("cpu")[0], batch_size)}
    if not args.no_torch_compile:
        compiled = TrainStep(copy.deepcopy(model).train(), replace(cfg, compile=True),
                             torch.device("cpu"), batch_size, total_steps=None)  # fmt: skip
        assert compiled.forward is not compiled.model
        steppers["torch.compile"] = compiled
    steppers["torch"] = TrainStep(model.train(), cfg, torch.device("cpu"), batch_size, total_steps=None)
    steppers = {k: steppers[k] for k in ("torch", "torch.compile", "jax") if k in steppers}
    for s in steppers.values():
        s.set_lr(1.0)  # the peak learning rate, 1e-3
    data = {name: Batches(batch_size, block_size) for name in steppers}

    def one(name: str) -> float:
        loss, _ = steppers[name](*data[name].next())
        return float(loss)  # waits for the step (JAX dispatches asynchronously)

    losses: dict[str, list[float]] = {name: [] for name in steppers}
    first: dict[str, float] = {}
    for name in steppers:  # warm-up: the first step compiles (JAX; torch.compile)
        for i in range(max(args.warmup, LOSS_STEPS)):
            t0 = time.perf_counter()
            loss = one(name)
            if i == 0:
                first[name] = time.perf_counter() - t0
            if i < LOSS_STEPS:
                losses[name].append(loss)
    diff = max(abs(a - b) for name in steppers for a, b in zip(losses[name], losses["torch"]))
    assert diff < 1e-4, f"the sides' first losses disagree: {losses}"

    def timed(name: str) -> Callable[[], None]:
        return lambda: [one(name) for _ in range(args.steps)]

    times = rounds({name: timed(name) for name in steppers}, args.rounds)
    per_step = {name: statistics.median(v) / args.steps for name, v in times.items()}
    tokens = batch_size * block_size
    row = {
        "arch": arch,
        "shape": f"{batch_size} x {block_size}",
        "ms": {name: 1000 * s for name, s in per_step.items()},
        "tok_s": {name: tokens / s for name, s in per_step.items()},
        "ratio": {name: statistics.median(ratios(times, "torch", name)) for name in steppers},
        "span": {name: span(ratios(times, "torch", name)) for name in steppers},
        "first": first,
        "compile": {name: first[name] - per_step[name] for name in steppers},
        "losses": losses,
        "diff": diff,
    }
    sides = ", ".join(
        f"{name} {row['ms'][name]:.0f} ms/step ({row['tok_s'][name]:,.0f} tok/s, first step {first[name]:.1f} s)"
        for name in steppers
    )
    print(
        f"train {arch:>6}, {row['shape']}: {sides}; "
        + ", ".join(f"{n}/PyTorch {row['ratio'][n]:.2f}x (rounds {row['span'][n]})" for n in steppers if n != "torch")
        + "\n  first losses: "
        + "; ".join(f"{n} {', '.join(f'{v:.6f}' for v in ls)}" for n, ls in losses.items())
        + f" (max difference {diff:.1e})",
        flush=True,
    )
    jax.clear_caches()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per row")
    p.add_argument("--steps", type=int, default=3, help="training steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="training warm-up steps per side (the first compiles)")
    p.add_argument("--archs", default="modern,gpt2", help="model.arch of the generation rows")
    p.add_argument("--batches", default="1,8", help="generation batch sizes")
    p.add_argument("--train-archs", default="modern", help="model.arch of the training rows")
    p.add_argument("--train-shapes", default="8x256,16x128", help="training batch x context, comma-separated")
    p.add_argument("--no-torch-compile", action="store_true", help="skip TrainStep with TrainConfig(compile=True)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, modern arch, 8 x 256, no torch.compile")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 2, 3
        args.archs, args.train_archs, args.train_shapes = "modern", "modern", "8x256"
        args.no_torch_compile = True
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    import jax

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} on "
        f"{jax.devices('cpu')[0]} (XLA's own thread pool, not set by --threads); {SHAPE}, vocab {VOCAB}, fp32",
        flush=True,
    )
    gen_rows = []
    if not args.no_generate:
        for arch in args.archs.split(","):
            gen_rows += bench_generation(arch.strip(), [int(b) for b in args.batches.split(",")], args.rounds)
    train_rows = []
    if not args.no_train:
        for arch in args.train_archs.split(","):
            for shape in args.train_shapes.split(","):
                b, t = (int(v) for v in shape.lower().split("x"))
                train_rows.append(bench_training(arch.strip(), b, t, args))

    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if gen_rows:
        print(
            f"\nGeneration ({PROMPT}-token prompts, {NEW} new tokens, greedy; JAX / PyTorch = median over rounds of "
            "PyTorch time / JAX time)\n\n"
            "| arch | batch | PyTorch tok/s | JAX tok/s | JAX / PyTorch | JAX first call (compile) | same tokens |\n"
            "|---|---|---|---|---|---|---|"
        )
        for r in gen_rows:
            print(
                f"| {r['arch']} | {r['batch']} | {r['torch']:,.0f} | {r['jax']:,.0f} | **{r['ratio']:.2f}x** "
                f"(rounds {r['span']}) | {r['jax_first']:.1f} s (~{r['jax_compile']:.1f} s) | {r['same']} |"
            )
    if train_rows:
        names = list(train_rows[0]["ms"])
        others = [n for n in names if n != "torch"]
        label = {"torch": "PyTorch", "torch.compile": "PyTorch compiled", "jax": "JAX"}
        print(
            "\nTraining step (AdamW, fp32; ratio = median over rounds of PyTorch eager time / side time)\n\n"
            "| arch | batch x context | "
            + " | ".join(f"{label[n]} ms/step (tok/s)" for n in names)
            + " | "
            + " | ".join(f"{label[n]} / PyTorch" for n in others)
            + " | first step (compile), "
            + ", ".join(label[n] for n in others)
            + " | first 3 losses, max diff |\n"
            + "|---" * (4 + len(names) + len(others))
            + "|"
        )
        for r in train_rows:
            print(
                f"| {r['arch']} | {r['shape']} | "
                + " | ".join(f"{r['ms'][n]:,.0f} ({r['tok_s'][n]:,.0f})" for n in names)
                + " | "
                + " | ".join(f"**{r['ratio'][n]:.2f}x** (rounds {r['span'][n]})" for n in others)
                + " | "
                + ", ".join(f"{r['first'][n]:.1f} s" for n in others)
                + f" | {r['diff']:.0e} |"
            )


if __name__ == "__main__":
    main()
