"""Generation speed: gptlab's engine against Hugging Face `GPT2LMHeadModel.generate` on the same weights.

A GPT-2-shaped model (6 layers, 6 heads, 384 dims, context 256) with seeded random weights, built in
gptlab (`model.arch=gpt2`) and copied into `transformers.GPT2LMHeadModel` (SDPA attention, KV cache), fp32
on the CPU. For vocab 65 and 50257 and batch 1 and 8, each side generates 200 new tokens greedily after
the same 16-token prompts; the tokens are checked identical, then both are timed in interleaved rounds
(the order alternating) and the ratio is the median over rounds of (HF time / gptlab time).

    python benchmarks/generate_speed.py             # as recorded in RESULTS.md
    python benchmarks/generate_speed.py --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

from gptlab.config import ModelConfig
from gptlab.generate import Generator
from gptlab.interop.hf import to_hf
from gptlab.model import GPT

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
PROMPT, NEW = 16, 200


def gptlab_model(vocab_size: int) -> GPT:
    """The benchmark's model with seeded random weights, fp32, eval mode."""
    torch.manual_seed(0)
    return GPT(ModelConfig(arch="gpt2", vocab_size=vocab_size, dropout=0.0, **SHAPE)).eval()


def generate_gptlab(gen: Generator, prompts: torch.Tensor) -> list[list[int]]:
    return gen.generate(prompts.tolist(), NEW, temperature=0)


def generate_hf(hf, prompts: torch.Tensor) -> list[list[int]]:  # noqa: ANN001
    with torch.no_grad():
        out = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return out[:, prompts.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocabs", default="65,50257")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    import transformers

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, python {sys.version.split()[0]}; {SHAPE}, fp32, "
        f"{PROMPT}-token prompts, {NEW} new tokens, greedy",
        flush=True,
    )
    rows = []
    for vocab in map(int, args.vocabs.split(",")):
        model = gptlab_model(vocab)
        hf = to_hf(model)  # the same weights, as `gptlab export` writes them
        assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
        gen = Generator(model)
        with torch.no_grad():
            x = torch.randint(0, vocab, (2, 32))
            diff = (model(x) - hf(x).logits).abs().max().item()
        assert diff < 1e-4, f"the copied weights disagree: max logit difference {diff}"
        for batch in map(int, args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, vocab, (batch, PROMPT), generator=g)

            ours = functools.partial(generate_gptlab, gen, prompts)
            theirs = functools.partial(generate_hf, hf, prompts)
            assert ours() == theirs(), f"different greedy tokens at vocab {vocab}, batch {batch}"
            times: dict[str, list[float]] = {"gptlab": [], "hf": []}
            for r in range(args.rounds):
                for name, side in (
                    [("gptlab", ours), ("hf", theirs)] if r % 2 == 0 else [("hf", theirs), ("gptlab", ours)]
                ):
                    t0 = time.perf_counter()
                    side()
                    times[name].append(time.perf_counter() - t0)
            ratio = statistics.median(h / o for h, o in zip(times["hf"], times["gptlab"], strict=True))
            speed = {k: batch * NEW / statistics.median(v) for k, v in times.items()}
            rows.append((vocab, batch, speed["gptlab"], speed["hf"], ratio))
            print(
                f"vocab {vocab:>5}, batch {batch}: gptlab {speed['gptlab']:,.0f} tok/s, HF {speed['hf']:,.0f} tok/s, "
                f"gptlab/HF {ratio:.2f}x (rounds: "
                + ", ".join(f"{h / o:.2f}" for h, o in zip(times["hf"], times["gptlab"], strict=True))
                + "); same greedy tokens",
                flush=True,
            )
    print("\n| vocab | batch | gptlab tok/s | HF tok/s | gptlab / HF |\n|---|---|---|---|---|")
    for vocab, batch, ours_s, hf_s, ratio in rows:
        print(f"| {vocab} | {batch} | {ours_s:,.0f} | {hf_s:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
