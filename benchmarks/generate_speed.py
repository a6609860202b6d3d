"""Generation speed: gptlab's engine against Hugging Face `GPT2LMHeadModel.generate` and llama.cpp on the same weights.

A GPT-2-shaped model (6 layers, 6 heads, 384 dims, context 256) with seeded random weights, built in gptlab
(`model.arch=gpt2`), copied into `transformers.GPT2LMHeadModel` (SDPA attention, KV cache), and written as a gptlab
run directory exported to GGUF (`gptlab.interop.gguf.export_gguf`, f32 and q8_0) for llama.cpp (llama-cpp-python: the
model loaded by `llama_cpp.Llama`, prompts decoded through its `llama_decode` with one sequence per row, a KV cache of
f32 as gptlab's, tokens picked by llama.cpp's greedy sampler). gptlab runs four ways: eager fp32 (the default; its
matmuls through oneDNN over weights packed once, `decode.packs`), `--compile` (`Decoder(model, compile=True)`,
compiled in each side's first, untimed run), `--quantize int8` (`quantize_int8`) and both. All fp32 on the CPU (but
the int8 and q8_0 matrices), the same thread count on every side. For vocab 65 and 50257 and batch 1 and 8, each side
generates 200 new tokens greedily after the same 16-token prompts; gptlab's tokens are checked equal to HF's, to
compiled gptlab's and to llama.cpp f32's (int8's and q8_0's against fp32: how many of the first tokens agree; the
random weights' near-ties break either way, and compiled int8 rounds differently from eager int8), then all are timed
in interleaved rounds (the order rotating). Each run is timed whole and split at its first new token: the prompt's
forward, then the 199 decode steps (ms a step; a step gives one token per row).

The header prints the CPU, its vector extensions and L3 size, torch's BLAS, and the GB/s of large fp32 GEMVs (a
50257x384 matrix, and four 4096x4096 ones in turn: torch's in both weight layouts and packed for oneDNN, numpy's
BLAS) and of a plain read;
the floor of a step is the bytes it must read (every weight once, the head whole, and the KV cache at the run's mean
length) at the best of those rates. A model that nearly fits the L3 (vocab 65: 42 MB) can beat that floor.

    python benchmarks/generate_speed.py             # as recorded in RESULTS.md
    python benchmarks/generate_speed.py --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import decode
from gptlab.config import ModelConfig
from gptlab.decode import Decoder
from gptlab.generate import Engine, Generator, SamplingParams
from gptlab.interop import runs
from gptlab.interop.hf import to_hf
from gptlab.model import GPT
from gptlab.quantize import quantize_int8
from gptlab.tokenizers import Tokenizer

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
PROMPT, NEW = 16, 200
EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
GGML_F32 = 0  # ggml_type of an f32 KV cache


@dataclass
class Timed:
    """One generation: each row's new tokens, and its time whole, to its first new token, and per decode step."""

    tokens: list[list[int]]
    total: float
    prefill: float  # from the call to the first new token of every row (the prompt's forward and a pick)
    step: float  # the mean of the NEW - 1 decode steps after it


def timed(tokens: list[list[int]], marks: list[float]) -> Timed:
    """`marks`: the time at the start, after the first new token, and at the end."""
    start, first, end = marks
    return Timed(tokens, end - start, first - start, (end - first) / (NEW - 1))


def cpu_line() -> str:
    """The CPU's model and which of the vector extensions that matter here it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return f"cpu: {model} (no /proc/cpuinfo)"
    try:  # a model that nearly fits the last-level cache is read faster than the GEMVs below stream
        l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        l3 = "?"
    return f"cpu: {model}, {os.cpu_count()} CPUs, L3 {l3}; " + " ".join(
        f"{e}{'+' if e in flags else '-'}" for e in EXTENSIONS
    )


def gptlab_model(vocab_size: int) -> GPT:
    """The benchmark's model with seeded random weights, fp32, eval mode."""
    torch.manual_seed(0)
    return GPT(ModelConfig(arch="gpt2", vocab_size=vocab_size, dropout=0.0, **SHAPE)).eval()


def write_run(folder: Path, model: GPT) -> Path:
    """`model` as a run directory (its only checkpoint), with a character tokenizer of up to 64 symbols and an end of
    text, which is all `export_gguf` needs: the benchmark feeds token ids, never text."""
    symbols = [chr(c) for c in range(33, 127)][: min(64, model.cfg.vocab_size - 1)]
    return runs.write_run(folder, model, Tokenizer.train_char(["".join(symbols)], ["<|endoftext|>"]))


def generate_gptlab(
    model: GPT, prompts: torch.Tensor, threads: list[int] | None = None, compile: bool | Decoder = False
) -> Timed:
    """What `Generator.generate(prompts, NEW, temperature=0)` does, with the time of its first step (the prompts'
    forward) apart; `threads` gets the count the engine's thread governor ended at."""
    engine = Engine(model, None, max_batch=len(prompts), compile=compile)
    rows = {
        engine.submit(p, NEW, SamplingParams(temperature=0.0), stop_at_eos=False): b
        for b, p in enumerate(prompts.tolist())
    }
    out: list[list[int]] = [[] for _ in rows]
    marks = [time.perf_counter()]
    while engine.has_work():
        for u in engine.step():
            out[rows[u.id]] += u.token_ids
        if len(marks) == 1:
            marks.append(time.perf_counter())
    marks.append(time.perf_counter())
    if threads is not None:
        threads.append(engine.threads.current)
    return timed(out, marks)


class _Marks:
    """A `transformers` streamer that notes the time of each put: the prompt first, then each step's tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_hf(hf, prompts: torch.Tensor) -> Timed:  # noqa: ANN001
    marks = _Marks()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, eos_token_id=None, streamer=marks,
        )  # fmt: skip
    end = time.perf_counter()
    assert len(marks.times) == NEW + 1, len(marks.times)
    return timed(out[:, prompts.shape[1] :].tolist(), [start, marks.times[1], end])


class LlamaCpp:
    """llama.cpp on a GGUF file: batch B as B sequences of one context, decoded together by `llama_decode`."""

    def __init__(self, gguf_file: Path, batch: int, threads: int) -> None:
        import llama_cpp

        self.lib, self.batch = llama_cpp, batch
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_file), n_ctx=SHAPE["block_size"], n_threads=threads, n_threads_batch=threads,
            n_batch=max(512, batch * PROMPT), verbose=False, type_k=GGML_F32, type_v=GGML_F32,
        )  # fmt: skip
        # the Llama's own context holds one sequence: one for `batch` of them, with its settings otherwise
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.n_seq_max, params.n_ctx, params.kv_unified = batch, batch * SHAPE["block_size"], False
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp made no context for {batch} sequences")
        self.tokens = llama_cpp.llama_batch_init(batch * PROMPT, 0, 1)
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """The batch's tokens as (token, position, sequence, whether its logits are wanted)."""
        b = self.tokens
        b.n_tokens = len(entries)
        for i, (token, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(out)
            b.seq_id[i][0] = seq

    def _decode(self) -> None:
        if self.lib.llama_decode(self.ctx, self.tokens) != 0:
            raise RuntimeError("llama_decode failed")

    def __call__(self, prompts: torch.Tensor) -> Timed:
        lib, ctx, B = self.lib, self.ctx, self.batch
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        rows = prompts.tolist()
        out: list[list[int]] = [[] for _ in rows]
        marks = [time.perf_counter()]
        self._fill([(t, p, s, p == len(r) - 1) for s, r in enumerate(rows) for p, t in enumerate(r)])
        self._decode()
        picks = [s * PROMPT + PROMPT - 1 for s in range(B)]  # the batch index of each row's logits
        for n in range(NEW):
            for s in range(B):
                out[s].append(lib.llama_sampler_sample(self.sampler, ctx, picks[s]))
            if n == 0:
                marks.append(time.perf_counter())
            if n == NEW - 1:
                break
            self._fill([(out[s][-1], PROMPT + n, s, True) for s in range(B)])
            self._decode()
            picks = list(range(B))
        marks.append(time.perf_counter())
        return timed(out, marks)

    def close(self) -> None:
        self.lib.llama_sampler_free(self.sampler)
        self.lib.llama_batch_free(self.tokens)
        self.lib.llama_free(self.ctx)
        self.llm.close()


def stream_rates() -> dict[str, float]:
    """GB/s of large fp32 matrix-vector products (torch's, each weight layout, and numpy's BLAS) and of a plain read
    (`amax`): how fast this machine streams weights, the best of which makes the floor."""

    def rate(mats: list[torch.Tensor], fn: Callable[[torch.Tensor], object], reps: int = 60) -> float:
        for w in mats:
            fn(w)
        times = []
        for i in range(reps):
            w = mats[i % len(mats)]
            t0 = time.perf_counter()
            fn(w)
            times.append(time.perf_counter() - t0)
        return mats[0].numel() * 4 / statistics.median(times) / 1e9

    g = torch.Generator().manual_seed(0)
    head = [torch.randn(50257, 384, generator=g)]
    big = [torch.randn(4096, 4096, generator=g) for _ in range(4)]  # 268 MB in turn: past any cache
    x = torch.randn(1, 4096, generator=g)
    rates = {}
    for name, mats in (("GEMV 50257x384", head), ("GEMV 4096x4096", big)):
        transposed = [w.t().contiguous().t() for w in mats]  # the same matrices stored (in, out)
        rates[f"{name} F.linear (out,in)"] = rate(mats, lambda w: F.linear(x[:, : w.shape[1]], w))
        rates[f"{name} x @ W.T (in,out)"] = rate(transposed, lambda w: F.linear(x[:, : w.shape[1]], w))
        del transposed
        if decode.packs(mats[0]):  # the eager decoder's matmuls
            packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in mats]
            rates[f"{name} oneDNN packed"] = rate(packed, lambda w: decode._packed_linear(x[:, : w.shape[1]], w, None))
            del packed
    xn = x[0].numpy()
    rates["GEMV 4096x4096 numpy W @ x"] = rate(big, lambda w: w.numpy() @ xn)
    rates["read 4096x4096 amax"] = rate(big, torch.amax)
    return rates


def bytes_read(model: GPT, batch: int, gguf_file: Path | None = None) -> int:
    """Bytes a decode step reads: every weight once (the head whole; of the embeddings one row each), and each row's
    keys and values at the run's mean cache length. The weights' bytes as stored in `gguf_file`, if given."""
    cfg = model.cfg
    kv = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * 4 * (PROMPT + NEW / 2) * batch
    if gguf_file is not None:
        from gguf import GGUFReader

        tensors = GGUFReader(gguf_file).tensors
        return int(kv + sum(int(t.n_bytes) for t in tensors if t.name != "position_embd.weight"))
    weights = sum(p.nbytes for p in model.parameters())  # a tied head counted once, as the head
    if model.pos_emb is not None:
        weights -= model.pos_emb.weight.nbytes
    if model.tok_emb.weight is not model.lm_head.weight:
        weights -= model.tok_emb.weight.nbytes
    return int(kv + weights)


def common_prefix(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """How many leading tokens each row of `a` and `b` agree on."""
    return [
        next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        for x, y in zip(a, b, strict=True)
    ]


def spread(values: list[float], scale: float = 1e3) -> str:
    """Median (min-max), in ms."""
    return f"{statistics.median(values) * scale:.2f} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


def prefixes(counts: list[int]) -> str:
    """Rows' agreeing leading tokens: "200 of 200", or by row "0, 200, 13, ... of 200"."""
    return f"{counts[0] if len(set(counts)) == 1 else ', '.join(map(str, counts))} of {NEW}"


def prefill(runs: list[Timed]) -> str:
    """The median time to the first new token, in ms."""
    return f"{statistics.median(t.prefill for t in runs) * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocabs", default="65,50257")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out (llama-cpp-python not installed)")
    args = parser.parse_args()
    import transformers

    threads = torch.get_num_threads()
    llama_version = "left out"
    if not args.no_llama:
        import llama_cpp

        llama_version = f"{llama_cpp.__version__} ({llama_cpp.llama_print_system_info().decode().strip(' |')})"
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    print(
        f"machine: {cpu_line()}\n"
        f"torch {torch.__version__} ({threads} threads, {blas}, oneDNN {torch.backends.mkldnn.is_available()}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}, "
        f"llama-cpp-python {llama_version}, python {sys.version.split()[0]}, load average "
        f"{os.getloadavg()[0]:.2f}\n"
        f"model {SHAPE}, fp32, {PROMPT}-token prompts, {NEW} new tokens, greedy; llama.cpp with {threads} threads and "
        "an f32 KV cache",
        flush=True,
    )
    rates = stream_rates()
    bandwidth = max(rates.values())
    print(
        "GB/s (median of 60): " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        + f"; the floor below takes the best, {bandwidth:.1f} GB/s",
        flush=True,
    )  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptlab-generate-speed-") as tmp:
        for vocab in map(int, args.vocabs.split(",")):
            model = gptlab_model(vocab)
            int8 = quantize_int8(copy.deepcopy(model))
            # compiled once per model, for batch 1 and for larger batches (in each side's first run, untimed)
            compiled = {"fp32": Decoder(model, compile=True), "int8": Decoder(int8, compile=True)}
            hf = to_hf(model)  # the same weights, as `gptlab export` writes them
            assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
            with torch.no_grad():
                x = torch.randint(0, vocab, (2, 32))
                diff = (model(x) - hf(x).logits).abs().max().item()
            assert diff < 1e-4, f"the copied weights disagree: max logit difference {diff}"
            ggufs: dict[str, Path] = {}
            if not args.no_llama:
                from gptlab.interop.gguf import export_gguf

                run = write_run(Path(tmp) / f"run-{vocab}", model)
                for dtype in ("f32", "q8_0"):
                    ggufs[dtype] = export_gguf(run, Path(tmp) / f"gguf-{vocab}-{dtype}", dtype=dtype) / "model.gguf"
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(batch)
                prompts = torch.randint(0, vocab, (batch, PROMPT), generator=g)
                gov: list[int] = []
                sides: dict[str, Callable[[], Timed]] = {
                    "gptlab": lambda prompts=prompts, gov=gov, model=model: generate_gptlab(model, prompts, gov),
                    "gptlab compiled": lambda prompts=prompts, model=model, c=compiled["fp32"]: generate_gptlab(
                        model, prompts, compile=c
                    ),
                    "gptlab int8": lambda prompts=prompts, int8=int8: generate_gptlab(int8, prompts),
                    "gptlab int8 compiled": lambda prompts=prompts, int8=int8, c=compiled["int8"]: generate_gptlab(
                        int8, prompts, compile=c
                    ),
                    "HF": lambda prompts=prompts, hf=hf: generate_hf(hf, prompts),
                }
                llamas = [LlamaCpp(ggufs[d], batch, threads) for d in ggufs]
                for dtype, llama in zip(ggufs, llamas, strict=True):
                    sides[f"llama.cpp {dtype}"] = lambda prompts=prompts, llama=llama: llama(prompts)
                try:
                    ours = sides["gptlab"]().tokens  # each side's first run: the checks, and a warm-up
                    assert ours == Generator(model).generate(prompts.tolist(), NEW, temperature=0)
                    assert ours == sides["HF"]().tokens, (
                        f"different greedy tokens from HF at vocab {vocab}, batch {batch}"
                    )
                    assert ours == sides["gptlab compiled"]().tokens, f"compiled differs at {vocab}, batch {batch}"
                    same = {
                        name: common_prefix(ours, sides[f"gptlab {name}"]().tokens)
                        for name in ("int8", "int8 compiled")
                    }
                    for dtype in ggufs:
                        same[f"llama.cpp {dtype}"] = common_prefix(ours, sides[f"llama.cpp {dtype}"]().tokens)
                    if "llama.cpp f32" in same:
                        assert min(same["llama.cpp f32"]) == NEW, (
                            f"llama.cpp f32's greedy tokens leave gptlab's after {same['llama.cpp f32']} at vocab "
                            f"{vocab}, batch {batch}"
                        )  # fmt: skip
                    times: dict[str, list[Timed]] = {name: [] for name in sides}
                    names = list(sides)
                    for r in range(args.rounds):
                        for name in names[r % len(names) :] + names[: r % len(names)]:
                            times[name].append(sides[name]())
                finally:
                    for llama in llamas:
                        llama.close()
                floors = {
                    "f32": bytes_read(model, batch) / bandwidth / 1e9,
                    "int8": bytes_read(int8, batch) / bandwidth / 1e9,
                }
                if "q8_0" in ggufs:
                    floors["q8_0"] = bytes_read(model, batch, ggufs["q8_0"]) / bandwidth / 1e9
                steps = {name: [t.step for t in ts] for name, ts in times.items()}
                ratio_hf, ratio_hf_compiled = (
                    statistics.median(h.total / o.total for h, o in zip(times["HF"], times[side], strict=True))
                    for side in ("gptlab", "gptlab compiled")
                )
                ratio_llama = (
                    statistics.median(
                        o / c for o, c in zip(steps["gptlab compiled"], steps["llama.cpp f32"], strict=True)
                    )
                    if "llama.cpp f32" in steps
                    else None
                )
                int8_gain = {  # fp32 ms / int8 ms, eager and compiled alike
                    mode: statistics.median(
                        f / i for f, i in zip(steps[f"gptlab{mode}"], steps[f"gptlab int8{mode}"], strict=True)
                    )
                    for mode in ("", " compiled")
                }
                speed = {k: batch * NEW / statistics.median(t.total for t in v) for k, v in times.items()}
                rows.append((vocab, batch, floors, steps, ratio_hf, ratio_hf_compiled, ratio_llama, int8_gain))
                print(
                    f"vocab {vocab:>5}, batch {batch}: decode ms a step, median (range) of {args.rounds}: "
                    + ", ".join(f"{k} {spread(v)}" for k, v in steps.items())
                    + "; floor " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in floors.items())
                    + "; prompt ms " + ", ".join(f"{k} {prefill(v)}" for k, v in times.items())
                    + "; tok/s whole: " + ", ".join(f"{k} {v:,.0f}" for k, v in speed.items())
                    + f"; gptlab/HF {ratio_hf:.2f}x (compiled {ratio_hf_compiled:.2f}x)"
                    + (f", gptlab compiled ms / llama.cpp f32 ms {ratio_llama:.2f}" if ratio_llama is not None else "")
                    + f", int8's speed-up {int8_gain[''] :.2f}x (eager), {int8_gain[' compiled']:.2f}x (compiled)"
                    + f"; gptlab threads at the end of each run: {gov}"
                    + "; same greedy tokens as HF and compiled"
                    + "".join(f", as {d} for the first {prefixes(n)}" for d, n in same.items()),
                    flush=True,
                )  # fmt: skip
    print(
        "\nDecode: ms per step (one new token per row), median (range) over rounds; floor: bytes read per step / best"
        " GB/s above. compiled: `--compile`; int8: `--quantize int8`.\n\n| vocab | batch | floor f32 (int8) | gptlab |"
        " gptlab compiled | gptlab int8 | gptlab int8 compiled | llama.cpp f32 | llama.cpp q8_0 | HF |"
        " compiled / llama.cpp f32 | int8 speed-up eager (compiled) | gptlab / HF tok/s (compiled) |\n"
        + "|---" * 13 + "|"
    )  # fmt: skip
    for vocab, batch, floors, steps, ratio_hf, ratio_hf_compiled, ratio_llama, int8_gain in rows:
        cell = functools.partial(lambda steps, k: spread(steps[k]) if k in steps else "-", steps)
        floor = f"{floors['f32'] * 1e3:.2f} ({floors['int8'] * 1e3:.2f})"
        print(
            f"| {vocab} | {batch} | {floor} | {cell('gptlab')} | {cell('gptlab compiled')} | {cell('gptlab int8')} | "
            f"{cell('gptlab int8 compiled')} | {cell('llama.cpp f32')} | {cell('llama.cpp q8_0')} | {cell('HF')} | "
            f"{f'{ratio_llama:.2f}x' if ratio_llama else '-'} | {int8_gain['']:.2f}x ({int8_gain[' compiled']:.2f}x) | "
            f"{ratio_hf:.2f}x ({ratio_hf_compiled:.2f}x) |"
        )


if __name__ == "__main__":
    main()
