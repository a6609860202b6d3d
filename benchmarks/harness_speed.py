"""lm-evaluation-harness speed: `--model gptlab` against `--model hf` on the same loglikelihood requests.

A GPT-2-shaped model (6 layers, 6 heads, 384 dims, context 256, GPT-2's 50,257-token BPE) with seeded random
weights, written as a gptlab run directory and exported with `gptlab export`; lm-eval's `HFLM` loads the export
(fp32, CPU, SDPA attention). The requests are a multiple-choice task's: contexts of 60-180 tokens of Shakespeare,
four continuations of 8-32 tokens each, the right one the text that follows. Both models score the same
`Instance` list with the same batch size through `LM.loglikelihood` (what `lm_eval` calls); the scores are
checked equal (relative 1e-6), then both are timed in interleaved rounds, the order alternating; the ratio is the median
over rounds of (HF time / gptlab time).

    python benchmarks/harness_speed.py                    # as recorded
    python benchmarks/harness_speed.py --rounds 1 --questions 25
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.config import ModelConfig
from gptlab.interop import runs
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = SHARED / "tinyshakespeare.txt"
GPT2_FILES = SHARED / "cs336_fixtures" / "spring2024" / "tests" / "fixtures"  # gpt2_vocab.json, gpt2_merges.txt


def write_run(folder: Path, tokenizer: Tokenizer) -> Path:
    """A run directory of the benchmark's model with seeded random weights (as `gptlab import hf` writes one)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="gpt2", vocab_size=tokenizer.vocab_size, dropout=0.0, **SHAPE)).eval()
    return runs.write_run(folder, model, tokenizer, meta={"benchmark": "harness_speed"})


def requests(tokenizer: Tokenizer, n_questions: int, seed: int = 0) -> list:
    """Multiple-choice loglikelihood requests as lm-eval makes them: (context, " " + ending) x 4 per question."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = TEXT.read_text(encoding="utf-8").split()
    out = []
    for q in range(n_questions):
        at = rng.randrange(len(words) - 400)
        n_ctx = rng.randint(40, 120)
        context = " ".join(words[at : at + n_ctx])
        endings = [" ".join(words[at + n_ctx : at + n_ctx + rng.randint(6, 20)])]
        for _ in range(3):
            other = rng.randrange(len(words) - 30)
            endings.append(" ".join(words[other : other + rng.randint(6, 20)]))
        for i, ending in enumerate(endings):
            out.append(Instance("loglikelihood", {}, (context, " " + ending), idx=i, metadata=("bench", q, 1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100, help="4 requests each")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from gptlab.interop.harness import GptlabLM

    for needed in (TEXT, GPT2_FILES):
        if not needed.exists():
            sys.exit(f"error: {needed} not found (the workplace's shared data)")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, python {sys.version.split()[0]}; "
        f"{SHAPE}, vocab 50257 (GPT-2 BPE), fp32, batch size {args.batch_size}",
        flush=True,
    )
    tokenizer = Tokenizer.gpt2(GPT2_FILES)
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(Path(tmp) / "run", tokenizer)
        runs.export(run, Path(tmp) / "hf")
        ours = GptlabLM(run=str(run), device="cpu", batch_size=args.batch_size)
        theirs = HFLM(pretrained=str(Path(tmp) / "hf"), device="cpu", batch_size=args.batch_size)
        reqs = requests(tokenizer, args.questions)
        a = ours.loglikelihood(reqs, disable_tqdm=True)
        b = theirs.loglikelihood(reqs, disable_tqdm=True)
        # fp32 sums of up to 30 tokens of about -11 each (random weights): equal to float32 rounding
        diff = max(abs(x[0] - y[0]) / max(1.0, abs(y[0])) for x, y in zip(a, b, strict=True))
        assert diff < 1e-6 and [x[1] for x in a] == [y[1] for y in b], f"the scores differ: {diff}"
        times: dict[str, list[float]] = {"gptlab": [], "hf": []}
        sides = {"gptlab": ours, "hf": theirs}
        for r in range(args.rounds):
            for name in ("gptlab", "hf") if r % 2 == 0 else ("hf", "gptlab"):
                t0 = time.perf_counter()
                sides[name].loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - t0)
    ratios = [h / o for h, o in zip(times["hf"], times["gptlab"], strict=True)]
    speed = {k: len(reqs) / statistics.median(v) for k, v in times.items()}
    n_tokens = sum(len(tokenizer.encode(c + x)) for c, x in (r.args for r in reqs))
    print(
        f"{len(reqs)} loglikelihood requests ({n_tokens:,} tokens; largest relative score difference {diff:.1e}): "
        f"gptlab {speed['gptlab']:,.1f} req/s, HF {speed['hf']:,.1f} req/s, gptlab/HF {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})",
        flush=True,
    )


if __name__ == "__main__":
    main()
