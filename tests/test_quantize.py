"""Int8 weight-only inference (`--quantize int8`): the layers, the decoder over them, and trained models' text and
bits per byte against fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, scaled_model
from test_decode import decode_both
from test_gguf import NON_ASCII, bits_per_byte, prompt_of, train

from gptlab.cli import main
from gptlab.decode import Decoder
from gptlab.errors import GptlabError
from gptlab.generate import Generator
from gptlab.quantize import Int8Linear, check_quantize, quantize_int8
from gptlab.train.checkpoint import load_run


def test_int8_linear_rounds_each_output_channel_to_127_steps():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear.of(linear)
    assert q.weight.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and not q.weight.requires_grad
    assert (q.weight.abs().amax(dim=1) == 127).all()  # each row's largest weight takes the full range
    dequantized = q.weight.float() * q.scales.float()[:, None]
    step = q.scales.float()[:, None]  # the row's largest |w| / 127, rounded to bf16 (the row's largest is clamped)
    assert ((dequantized - linear.weight).abs() <= step * 0.51).all()  # half a step, and the largest's clamping
    x = torch.randn(5, 3, 64)
    ours = q(x)
    assert ours.shape == (5, 3, 48) and ours.dtype == torch.float32
    # what the kernel computes: the input rounded to bf16, the dequantized weights, a bf16 result
    expected = F.linear(x.bfloat16().float(), dequantized, None).bfloat16().float() + linear.bias
    assert torch.allclose(ours, expected, atol=2e-2, rtol=1e-2)
    assert (ours - linear(x)).norm() / linear(x).norm() < 1e-2


@pytest.mark.parametrize("lengths", [[5], [7, 7, 7], [3, 11, 1]], ids=["one row", "rows alike", "rows apart"])
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_the_decoder_computes_a_quantized_model_as_its_forward(arch, lengths):
    model = quantize_int8(scaled_model(block_size=16, arch=arch))
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert Decoder.covers(model)
    forward, decoded, (k0, k1, v0, v1) = decode_both(model, lengths)
    assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)
    assert torch.allclose(k0, k1, atol=1e-5, rtol=0) and torch.allclose(v0, v1, atol=1e-5, rtol=0)


def test_a_tied_head_becomes_its_own_int8_copy_and_the_cache_stays_fp32():
    model = scaled_model(block_size=16, arch="gpt2")
    assert model.lm_head.weight is model.tok_emb.weight
    quantize_int8(model)
    assert model.tok_emb.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.int8
    assert model.new_cache(2).k.dtype == torch.float32


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return {kind: train(tmp_path_factory.mktemp(kind.replace("+", "-")), kind) for kind in ("char", "gpt2+bpe")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "gpt2+bpe"])
def test_int8_keeps_a_trained_models_greedy_text_and_bits_per_byte(kind, runs):
    _, model, tokenizer = load_run(runs[kind])
    int8 = quantize_int8(copy.deepcopy(model))
    prompt = tokenizer.encode(prompt_of(kind))
    ours, theirs = (Generator(m).generate([prompt], 32, temperature=0)[0] for m in (model, int8))
    if kind == "char":  # the main job's config
        assert theirs == ours
    elif theirs != ours:  # a repetitive little model: int8's logits (bf16, ~0.2% apart) may break a near-tie
        i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        with torch.no_grad():
            fp32, q8 = (m(torch.tensor([prompt + ours[:i]]))[0, -1] for m in (model, int8))
        margin = (fp32[ours[i]] - fp32[theirs[i]]).item()
        assert i >= 16 and margin <= 2 * (fp32 - q8).abs().max().item(), (i, margin)
    held_out = tokenizer.encode(make_text(30, seed=7) + NON_ASCII)
    windows = [held_out[i : i + 64] for i in range(0, len(held_out) - 1, 64)][:4]
    found = {}
    for name, m in (("fp32", model), ("int8", int8)):
        nats = size = 0
        for ids in windows:
            with torch.no_grad():
                n, b = bits_per_byte(m(torch.tensor([ids]))[0].numpy(), ids, tokenizer)
            nats, size = nats + n, size + b
        found[name] = nats / size / 0.6931471805599453
    assert abs(found["int8"] - found["fp32"]) <= 0.01 * found["fp32"], found


@pytest.mark.slow
def test_sample_quantized_and_compiled_prints_what_the_quantized_generator_makes(runs, capsys):
    run = runs["char"]
    _, model, tokenizer = load_run(run)
    prompt = prompt_of("char")
    ids = Generator(quantize_int8(model)).generate([tokenizer.encode(prompt)], 24, temperature=0)[0]
    capsys.readouterr()
    argv = ["sample", str(run), "--start", prompt, "--num-samples", "1", "--max-new-tokens", "24",
            "--temperature", "0", "--quantize", "int8", "--compile"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(ids) + "\n"


def test_quantize_is_refused_where_it_cannot_run(tmp_path, capsys):
    with pytest.raises(GptlabError) as e:
        check_quantize("int8", "cuda")
    assert str(e.value) == (
        "--quantize int8 is a CPU path, not for cuda (leave --quantize out on a GPU (use --dtype bfloat16 there), "
        "or add --device cpu)"
    )
    with pytest.raises(GptlabError, match="unknown --quantize 'int4'"):
        check_quantize("int4", "cpu")
    assert main(["sample", str(tmp_path), "--backend", "jax", "--quantize", "int8"]) == 2
    assert "error: --compile and --quantize are for the PyTorch backend" in capsys.readouterr().err


def test_compile_without_a_cpp_compiler_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-c++")
    assert main(["sample", str(tmp_path), "--compile", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "error: --compile needs a C++ compiler on a CPU (no-such-c++ is not on the PATH) (install g++ (e.g. "
        "apt-get install g++) or set CXX, or leave out --compile)\n"
    )


@pytest.mark.slow
def test_serve_quantized_and_compiled_answers_as_the_quantized_generator(runs):
    from fastapi.testclient import TestClient

    from gptlab.serve import run_app

    app, _, _ = run_app(runs["char"], "tiny", checkpoint="latest", device="cpu", compile=True, quantize="int8")
    assert app.state.engine.decoder.compiled is not None
    _, model, tokenizer = load_run(runs["char"], "latest")
    prompt = prompt_of("char")
    expected = Generator(quantize_int8(model)).generate([tokenizer.encode(prompt)], 16, temperature=0)[0]
    try:  # compiled before serving: no compilation while answering
        with TestClient(app) as c, torch._dynamo.config.patch(error_on_recompile=True):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "n": 2}
            replies = [c.post("/v1/completions", json=body).json()["choices"] for _ in range(2)]
    finally:
        app.state.worker.close()
    assert [[choice["text"] for choice in reply] for reply in replies] == [[tokenizer.decode(expected)] * 2] * 2


COMPILED_INT8 = """
import sys, torch
from gptlab.config import ModelConfig
from gptlab.decode import Decoder
from gptlab.model import GPT
from gptlab.quantize import quantize_int8
torch.manual_seed(int(sys.argv[1]))
cfg = ModelConfig(arch="gpt2", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)
model = quantize_int8(GPT(cfg).eval())
ids, caches = torch.tensor([3]), [model.new_cache(1, 33) for _ in range(2)]
print((Decoder(model, compile=True)(ids, caches[0]) - Decoder(model)(ids, caches[1])).abs().max().item())
"""


@pytest.mark.slow
def test_a_compiled_int8_step_is_not_taken_from_another_models_cached_graph(tmp_path):
    """Two processes compile int8 models of the same shapes with one inductor cache: each computes its own weights."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for seed in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", COMPILED_INT8, str(seed)], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert float(out.split()[-1]) < 1e-2, (seed, out)  # int8's rounding apart; another model's weights: ~0.8
