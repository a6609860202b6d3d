"""The JAX GPT against the PyTorch one: logits, generations, compilations, training steps, run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # CI installs it (make test); an install without the extra skips these

import jax.numpy as jnp  # noqa: E402
from conftest import scaled_model, tiny_config  # noqa: E402
from jax import monitoring  # noqa: E402
from test_model import randomized  # noqa: E402
from test_trainer import StopAt  # noqa: E402

from gptlab.config import ModelConfig, TrainConfig, load_config  # noqa: E402
from gptlab.data.shards import prepare  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.generate import Generator, SamplingParams  # noqa: E402
from gptlab.jax.generate import JaxGenerator, bucket  # noqa: E402
from gptlab.jax.model import forward, from_torch, init_params, load_params, save_params, to_torch  # noqa: E402
from gptlab.jax.optim import Optimizer  # noqa: E402
from gptlab.jax.train import JaxTrainer, unsupported  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.tokenizers import Tokenizer  # noqa: E402
from gptlab.train.bench import bench  # noqa: E402
from gptlab.train.checkpoint import load_run  # noqa: E402
from gptlab.train.lr_finder import find_lr  # noqa: E402
from gptlab.train.muon import Muon as GptlabMuon  # noqa: E402
from gptlab.train.trainer import Trainer, check_world  # noqa: E402

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")

VARIANTS = {
    "gpt2": {"arch": "gpt2"},
    "modern": {"arch": "modern"},
    "gqa+qk_norm": {"arch": "modern", "n_kv_head": 1, "qk_norm": True},
    "gelu_exact+untied": {"arch": "gpt2", "mlp": "gelu_exact", "tie_embeddings": False},
    "gpt2+qk_norm": {"arch": "gpt2", "qk_norm": True},  # qk_norm is an RMSNorm under LayerNorm blocks too
    "parallel": {"arch": "modern", "parallel_block": True},
    "gpt2+parallel+gqa": {"arch": "gpt2", "parallel_block": True, "n_kv_head": 1},
    "relu2+softcap": {"arch": "modern", "mlp": "relu2", "logit_softcap": 15.0},
    "gpt2+relu2+softcap": {"arch": "gpt2", "mlp": "relu2", "logit_softcap": 30.0},
    # (their parameters random, not at init: see test_logits_equal_pytorch)
    "x0_lambdas+value_embeds+gqa": {"arch": "modern", "x0_lambdas": True, "value_embeds": True, "n_kv_head": 1},
    "gpt2+x0_lambdas+value_embeds": {"arch": "gpt2", "x0_lambdas": True, "value_embeds": True},
}


@pytest.fixture
def prepared(tmp_path: Path, text_file: Path):
    """conftest's prepared data, encoded in this process: forking (several workers) once JAX runs threads may hang."""
    cfg = tiny_config(tmp_path, text_file, "data.workers=1")
    prepare(cfg.data, quiet=True)
    return cfg


def torch_model(block_size: int = 32, vocab_size: int = 50, **switches) -> GPT:
    """A random PyTorch GPT with weights scaled up, so its next token depends on the whole context."""
    return scaled_model(vocab_size, block_size, **switches)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_pytorch(variant):
    model = randomized(torch_model(**VARIANTS[variant]))  # x0/residual lambdas and value embeddings nonzero
    idx = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx).numpy()
    got = np.asarray(forward(from_torch(model), model.cfg, jnp.asarray(idx.numpy())))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5


def test_long_contexts_and_bf16_follow_pytorch():
    # rotary tables are PyTorch's own: far positions agree as well as near ones
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=1024, n_layer=2, n_head=2, n_embd=64)).eval()
    idx = torch.randint(0, 50, (1, 1024), generator=torch.Generator().manual_seed(2))
    params = from_torch(model)
    with torch.no_grad():
        expected = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = model(idx).float()
    ids = jnp.asarray(idx.numpy())
    assert np.abs(np.asarray(forward(params, model.cfg, ids)) - expected.numpy()).max() < 1e-5
    # bf16 as autocast computes it (fp32 residual stream and norms): as close to fp32 as PyTorch's, and to it
    got_bf16 = np.asarray(forward(params, model.cfg, ids, dtype=jnp.bfloat16))
    torch_error = (expected_bf16 - expected).abs().max().item()
    assert np.abs(got_bf16 - expected.numpy()).max() < 2 * torch_error
    assert np.abs(got_bf16 - expected_bf16.numpy()).max() < 2 * torch_error


def test_parameters_convert_both_ways_exactly():
    model = torch_model(arch="modern", qk_norm=True)
    params = from_torch(model)
    assert params["blocks"]["attn.q.weight"].shape == (2, 32, 32)  # stacked layers, (in, out)
    back = to_torch(params, model.cfg)
    state = model.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    fresh = init_params(jax.random.key(0), model.cfg)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
    again = GPT(model.cfg)
    again.load_state_dict(to_torch(fresh, model.cfg))  # JAX's own init loads into PyTorch


def test_zero_init_out_initialises_as_pytorch_does():
    cfg = replace(torch_model().cfg, zero_init_out=True)
    fresh = init_params(jax.random.key(0), cfg)["blocks"]
    assert not np.asarray(fresh["attn.out.weight"]).any() and not np.asarray(fresh["mlp.down.weight"]).any()
    assert np.asarray(fresh["attn.q.weight"]).std() > 0.01
    ours = GPT(cfg)
    assert not ours.blocks[1].attn.out.weight.any() and not ours.blocks[1].mlp.down.weight.any()


def test_x0_lambdas_and_value_embeds_convert_initialise_and_generate_as_pytorch_s():
    model = randomized(torch_model(block_size=16, x0_lambdas=True, value_embeds=True, n_kv_head=1))
    params = from_torch(model)
    # value embeddings are tables, stacked by layer as PyTorch's rows (not transposed as a linear's weight)
    assert params["blocks"]["attn.value_embed.weight"].shape == (2, 50, 16) and params["x0_lambdas"].shape == (2,)
    assert np.array_equal(
        params["blocks"]["attn.value_embed.weight"][1], model.blocks[1].attn.value_embed.weight.detach()
    )
    back, state = to_torch(params, model.cfg), model.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    fresh = init_params(jax.random.key(0), model.cfg)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
    assert (
        not np.asarray(fresh["blocks"]["attn.value_embed.weight"]).any() and not np.asarray(fresh["x0_lambdas"]).any()
    )
    assert np.array_equal(fresh["resid_lambdas"], np.ones(2))  # as PyTorch's init: the model without the switches
    GPT(model.cfg).load_state_dict(to_torch(fresh, model.cfg))
    # the cached forward (prefill, then one token a step) adds each new token's value embedding before caching
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [5]]
    expected = Generator(model).generate(prompts, 30, temperature=0)
    assert JaxGenerator(params, model.cfg).generate(prompts, 30, temperature=0) == expected


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_greedy_generations_are_pytorch_s_token_for_token(arch):
    model = torch_model(block_size=16, arch=arch)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [5]]
    # 40 new tokens on a 16-token context: each row's window slides (at different steps) and is run again
    expected = Generator(model).generate(prompts, 40, temperature=0)
    gen = JaxGenerator(from_torch(model), model.cfg)
    assert gen.generate(prompts, 40, temperature=0) == expected
    assert gen.traces == {"prefill": 1, "decode": 1, "refill": 1}
    # end-of-text stops a row early (not returned), and the repetition penalty is applied as PyTorch applies it
    eos = expected[1][4]
    assert gen.generate(prompts, 40, temperature=0, eos_id=eos) == Generator(model).generate(
        prompts, 40, temperature=0, eos_id=eos
    )
    penalised = Generator(model).generate(prompts, 12, temperature=0, repetition_penalty=1.5)
    assert gen.generate(prompts, 12, temperature=0, repetition_penalty=1.5) == penalised != expected


def test_parallel_blocks_generate_pytorch_s_tokens_and_convert_both_ways():
    model = torch_model(block_size=16, arch="gpt2", parallel_block=True)
    params = from_torch(model)
    assert "norm2.weight" not in params["blocks"]  # one norm shared by attention and MLP
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [5]]
    expected = Generator(model).generate(prompts, 40, temperature=0)
    assert JaxGenerator(params, model.cfg).generate(prompts, 40, temperature=0) == expected
    fresh = init_params(jax.random.key(0), model.cfg)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
    GPT(model.cfg).load_state_dict(to_torch(fresh, model.cfg))


def count_backend_compiles() -> list[str]:
    """A list that every XLA compilation from now on appends to."""
    compiled: list[str] = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    monitoring.register_event_duration_secs_listener(listen)
    return compiled


def test_a_long_generation_compiles_once_for_prefill_and_once_for_decode():
    model = torch_model(block_size=256, arch="modern")
    gen = JaxGenerator(from_torch(model), model.cfg)
    compiled = count_backend_compiles()
    out = gen.generate([[1, 2, 3, 4, 5]], 200, temperature=0)
    assert len(out[0]) == 200
    assert gen.traces == {"prefill": 1, "decode": 1} and len(compiled) == 2
    # another prompt length in the same padding bucket (16), other sampling settings: nothing compiles again
    assert bucket(5, 256) == bucket(11, 256) == 16
    gen.generate([list(range(1, 12))], 50, temperature=0.8, top_k=5, top_p=0.9, seed=1)
    assert gen.traces == {"prefill": 1, "decode": 1} and len(compiled) == 2
    # a longer prompt is another bucket: one more prefill, the same decode
    gen.generate([list(range(1, 30))], 5, temperature=0)
    assert gen.traces == {"prefill": 2, "decode": 1} and len(compiled) == 3
    assert Generator(model).generate([[1, 2, 3, 4, 5]], 200, temperature=0) == out


def test_seeded_sampling_repeats_and_filters_as_asked():
    model = torch_model(arch="gpt2")
    gen = JaxGenerator(from_torch(model), model.cfg)
    prompts = [[1, 2], [3, 4, 5]]
    a = gen.generate(prompts, 20, temperature=1.0, seed=7)
    assert a == gen.generate(prompts, 20, temperature=1.0, seed=7)
    assert a != gen.generate(prompts, 20, temperature=1.0, seed=8)
    greedy = gen.generate(prompts, 20, temperature=0)
    assert a != greedy
    assert gen.generate(prompts, 20, temperature=1.0, top_k=1, seed=3) == greedy
    assert gen.generate(prompts, 20, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert gen.generate(prompts, 20, temperature=1.0, min_p=0.999, seed=3) == greedy
    # any seed PyTorch takes: negative ones (as 2**64 + seed), and all 64 bits of large ones; any top-k
    one = [[1, 2]]
    assert gen.generate(one, 20, temperature=1.0, seed=-1) == gen.generate(one, 20, temperature=1.0, seed=2**64 - 1)
    assert gen.generate(prompts, 20, temperature=1.0, seed=2**40) != gen.generate(prompts, 20, temperature=1.0, seed=0)
    assert gen.generate(prompts, 20, temperature=1.0, top_k=3_000_000_000, seed=7) == a
    # top-k keeps sampling among the k likeliest: over many draws, only those appear
    with torch.no_grad():
        top3 = set(model(torch.tensor([[1, 2]]))[0, -1].topk(3).indices.tolist())
    firsts = {gen.generate([[1, 2]], 1, temperature=2.0, top_k=3, seed=s)[0][0] for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char(["abcdefghij \n"])


def test_text_streams_and_stops_as_pytorch_s():
    tok = char_tokenizer()
    model = torch_model(vocab_size=tok.vocab_size, arch="modern")
    greedy = SamplingParams(temperature=0)
    expected = Generator(model, tok).complete("abc", 30, greedy)
    gen = JaxGenerator(from_torch(model), model.cfg, tok)
    pieces = list(gen.stream("abc", 30, greedy))
    assert "".join(pieces) == expected and len(pieces) > 1
    stop = expected[5:7]
    cut = "".join(gen.stream("abc", 30, greedy, stop=[stop]))
    assert cut == Generator(model, tok).complete("abc", 30, greedy, stop=[stop]) == expected[: expected.index(stop)]
    texts = gen.texts("abc", 3, 20, SamplingParams(temperature=1.0, seed=5))
    assert texts == gen.texts("abc", 3, 20, SamplingParams(temperature=1.0, seed=5)) and len(set(texts)) == 3
    with pytest.raises(ValueError, match="more than the context of 32"):
        gen.generate([[1] * 33], 5)
    assert len(gen.generate([[1] * 33], 5, temperature=0, truncate=True)[0]) == 5


@pytest.mark.parametrize(
    "arch,optimizer,switches",
    [
        ("gpt2", "adamw", []),
        ("modern", "adamw", []),
        ("modern", "muon", []),
        # the value embeddings stay on AdamW (as embeddings), the lambdas undecayed, in both
        ("modern", "muon", ["model.value_embeds=true", "model.x0_lambdas=true"]),
    ],
)
def test_training_steps_track_pytorch(prepared, tmp_path, arch, optimizer, switches):
    # the same initial weights and batches: 2 micro-batches per step, clipping on, the cosine schedule's warmup
    common = [f"model.arch={arch}", "train.micro_batch_size=2", "train.log_interval=1", "train.max_iters=10"]
    common += [f"train.optimizer={optimizer}", *switches]
    # Muon orthogonalises in bf16 in both (as torch.optim.Muon does), whose matmuls round differently in XLA and
    # oneDNN: its losses agree to that rounding (measured up to 2e-4 over 20 steps, 4e-5 over the first 5)
    tolerance = 1e-4 if optimizer == "adamw" else 5e-4
    torch_run = Trainer(
        tiny_config(tmp_path, Path(prepared.data.source), *common, "train.out_dir=" + str(tmp_path / "pt")), quiet=True
    ).fit()
    jax_cfg = tiny_config(
        tmp_path, Path(prepared.data.source), *common, "train.backend=jax", f"train.out_dir={tmp_path / 'jax'}"
    )
    jax_run = JaxTrainer(jax_cfg, quiet=True).fit()
    losses = [
        [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").open() if '"loss"' in line]
        for run in (torch_run, jax_run)
    ]
    assert len(losses[0]) == 10 and np.abs(np.subtract(*losses)).max() < tolerance
    val = [[h["val_loss"] for h in run.history] for run in (torch_run, jax_run)]
    assert np.abs(np.subtract(*val)).max() < tolerance
    # the JAX run's checkpoint is an ordinary one: PyTorch loads it, and its weights are the JAX parameters
    _, model, _ = load_run(jax_run.run_dir, "latest")
    assert (
        np.abs(
            np.asarray(forward(jax_run.stepper.params, model.cfg, jnp.asarray([[1, 2, 3]])))
            - model(torch.tensor([[1, 2, 3]])).detach().numpy()
        ).max()
        < 1e-5
    )


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_a_muon_step_is_torch_s(precision):  # Newton-Schulz in bf16 (torch.optim.Muon) or fp32 (gptlab's Muon)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 32) * 0.1)  # (out, in) as nn.Linear: taller than wide
    if precision == "bfloat16":
        opt = torch.optim.Muon([weight], lr=0.02, weight_decay=0.1)
    else:
        opt = GptlabMuon([weight], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    grads = [torch.randn(96, 32) * 0.01 for _ in range(3)]
    muon = Optimizer(
        TrainConfig(optimizer="muon", muon_lr=0.02, weight_decay=0.1, muon_precision=precision),
        {"blocks": {"w": jnp.zeros((1, 32, 96))}},
    )
    params = {"blocks": {"w": jnp.asarray(weight.detach().numpy().T[None])}}  # stacked, (in, out)
    state = muon.init(params)
    for g in grads:
        weight.grad = g
        opt.step()
        params, state = muon.update({"blocks": {"w": jnp.asarray(g.numpy().T[None])}}, state, params, 1.0)
        buffer = opt.state[weight]["momentum_buffer"].numpy().T
        assert np.abs(np.asarray(state[1].momentum["blocks"]["w"][0]) - buffer).max() < 1e-8
        # an update is lr * sqrt(3) * O with |O| < 0.5 in bf16 (8 bits): its rounding is below 0.02 * 1.8 * 2^-9;
        # in fp32 only the order of sums differs
        bound = 1e-4 if precision == "bfloat16" else 1e-6
        assert np.abs(np.asarray(params["blocks"]["w"][0]) - weight.detach().numpy().T).max() < bound


def test_jax_runs_resume_exactly_and_on_pytorch(prepared, tmp_path):
    src = Path(prepared.data.source)
    common = ["train.backend=jax", "model.dropout=0.1", "train.micro_batch_size=2", "train.optimizer=muon"]
    whole = JaxTrainer(tiny_config(tmp_path, src, *common, f"train.out_dir={tmp_path / 'whole'}"), quiet=True).fit()
    cut_cfg = tiny_config(tmp_path, src, *common, f"train.out_dir={tmp_path / 'cut'}")
    cut = JaxTrainer(cut_cfg, quiet=True)
    cut.callbacks.append(StopAt(13))  # between checkpoints
    cut.fit()
    assert cut.step == 13
    resumed = JaxTrainer(cut_cfg, quiet=True, resume=True).fit()
    assert resumed.history == whole.history  # dropout keys come from (seed, step): bit-identical
    same = jax.tree.map(lambda a, b: bool((a == b).all()), resumed.stepper.params, whole.stepper.params)
    assert all(jax.tree.leaves(same))
    # a JAX checkpoint is resumed by PyTorch from the same weights and optimizer state (Muon's and AdamW's)
    pt_cfg = tiny_config(
        tmp_path,
        src,
        "model.dropout=0.1",
        "train.micro_batch_size=2",
        "train.optimizer=muon",
        f"train.out_dir={tmp_path / 'cut'}",
    )
    pt = Trainer(pt_cfg, quiet=True, resume=True)
    assert pt.step == 20
    moments = pt.optimizers[-1].state[pt.model.tok_emb.weight]  # AdamW: embeddings, head, norms
    adam, muon = resumed.stepper.opt_state[0][0], resumed.stepper.opt_state[1]
    assert float(moments["step"]) == 20
    assert np.array_equal(moments["exp_avg"].numpy(), np.asarray(adam.mu["tok_emb.weight"]))
    assert np.array_equal(moments["exp_avg_sq"].numpy(), np.asarray(adam.nu["tok_emb.weight"]))
    assert torch.equal(pt.model.tok_emb.weight, torch.from_numpy(np.array(resumed.stepper.params["tok_emb.weight"])))
    buffer = pt.optimizers[0].state[pt.model.blocks[1].attn.q.weight]["momentum_buffer"]  # Muon: hidden matrices
    assert np.array_equal(buffer.numpy(), np.asarray(muon.momentum["blocks"]["attn.q.weight"][1]).T)


def test_settings_jax_does_not_support_are_named(prepared, tmp_path):
    src = Path(prepared.data.source)
    cases = {
        "train.profile=true": "error: train.profile is not supported with train.backend=jax yet (set train.profile=false, or train.backend=torch)",
        "train.dtype=float16": "error: train.dtype=float16 is not supported with train.backend=jax yet (use bfloat16 or float32, or train.backend=torch)",
    }
    for override, message in cases.items():
        with pytest.raises(GptlabError) as e:
            JaxTrainer(tiny_config(tmp_path, src, "train.backend=jax", override), quiet=True)
        assert f"error: {e.value}" == message
    assert not (tmp_path / "run").exists()
    lora = tiny_config(tmp_path, src, "train.backend=jax")
    lora.train.lora_rank = 4  # (a LoRA config also needs a base model; the backend check names the setting first)
    assert unsupported(lora) == ("train.lora_rank", "set train.lora_rank=0, or train.backend=torch")
    cfg = tiny_config(tmp_path, src, "train.backend=jax")
    with pytest.raises(GptlabError, match=r"train.backend=jax trains in one process \(drop --nproc"):
        check_world(cfg.train, 2)
    with pytest.raises(GptlabError, match="train.backend=jax is not trained by Trainer"):
        Trainer(cfg)
    with pytest.raises(GptlabError, match="gptlab find-lr sweeps with the PyTorch backend, not train.backend=jax"):
        find_lr(cfg)
    with pytest.raises(GptlabError, match="gptlab bench times the PyTorch step, not train.backend=jax"):
        bench(cfg)


def test_out_of_memory_names_the_knob(prepared, tmp_path):
    t = JaxTrainer(tiny_config(tmp_path, Path(prepared.data.source), "train.backend=jax"), quiet=True)

    def oom(x, y):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    t.stepper.__dict__["step_fn"] = lambda *args: oom(None, None)
    with pytest.raises(GptlabError) as e:
        t.fit()
    assert str(e.value).startswith("out of memory with micro-batches of 4 x 16 tokens (lower train.micro_batch_size")


def gptlab(*args: str, cwd: Path, hide_jax: bool = False) -> subprocess.CompletedProcess:
    hide = "import sys; sys.modules['jax'] = None; " if hide_jax else ""  # as if JAX were not installed
    code = f"{hide}import sys; from gptlab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True)


def test_cli_trains_and_samples_with_jax(prepared, tmp_path):
    data = [
        "model.block_size=16",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        f"data.dir={prepared.data.dir}",
    ]
    train = [
        "train.max_iters=5",
        "train.eval_interval=5",
        "train.eval_iters=1",
        "train.batch_size=4",
        "train.device=cpu",
    ]
    proc = gptlab(
        "train", *data, *train, "train.backend=jax", f"train.out_dir={tmp_path / 'j'}", "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained 5 steps" in proc.stdout
    meta = json.loads((tmp_path / "j" / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["backend"] == "jax"
    greedy = ["--temperature", "0", "--max-new-tokens", "30", "--num-samples", "1", "--start", "KING:"]
    ours = gptlab("sample", str(tmp_path / "j"), *greedy, "--backend", "jax", cwd=tmp_path)
    theirs = gptlab("sample", str(tmp_path / "j"), *greedy, cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout and len(ours.stdout) > len("KING:")
    missing = gptlab("sample", str(tmp_path / "j"), "--backend", "jax", cwd=tmp_path, hide_jax=True)
    assert missing.returncode == 2
    assert missing.stderr == "error: JAX is not installed: no module named 'jax' (pip install gptlab[jax])\n"
    bad = gptlab(
        "train",
        *data,
        *train,
        "train.backend=jax",
        "train.dtype=float16",
        f"train.out_dir={tmp_path / 'm'}",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.dtype=float16 is not supported")
    assert "Traceback" not in bad.stderr + missing.stderr


def test_params_load_from_and_save_to_run_directories(prepared, tmp_path):
    run = Trainer(
        tiny_config(tmp_path, Path(prepared.data.source), "train.max_iters=5", "train.eval_interval=5"), quiet=True
    ).fit()
    cfg, params, tokenizer = load_params(run.run_dir)
    assert tokenizer.vocab_size == cfg.model.vocab_size
    doubled = jax.tree.map(lambda a: a * 2, params)
    path = save_params(doubled, run.run_dir, step=6)
    assert path.name == "step_6"
    with pytest.raises(ValueError, match="already has a checkpoint step_6: give another step"):
        save_params(params, run.run_dir, step=6)
    _, model, _ = load_run(run.run_dir, "latest")
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(np.array(doubled["tok_emb.weight"])))


def test_a_task_in_epoch_mode_trains_as_on_pytorch(tmp_path):
    # masked targets (the loss on answers only), whole examples per epoch, and the exact-match score at the end
    from gptlab.data.tasks import prepare_task

    over = ["train.max_epochs=null", "train.max_iters=12", "train.eval_interval=6", "train.batch_size=16",
            "train.micro_batch_size=8", "task.eval_examples=20", "train.device=cpu"]  # fmt: skip
    configs = {}
    for backend in ("torch", "jax"):
        configs[backend] = load_config(
            Path(__file__).parent.parent / "configs" / "adder.yaml",
            [
                *over,
                f"data.dir={tmp_path / 'adder'}",
                f"train.out_dir={tmp_path / backend}",
                f"train.backend={backend}",
            ],
        )
    prepare_task(configs["torch"].task, configs["torch"].data.dir)
    runs = {"torch": Trainer(configs["torch"], quiet=True).fit(), "jax": JaxTrainer(configs["jax"], quiet=True).fit()}
    losses = [
        [json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").open() if '"loss"' in line]
        for r in runs.values()
    ]
    assert len(losses[0]) == 12 and np.abs(np.subtract(*losses)).max() < 1e-4
    val = [[h["val_loss"] for h in r.history] for r in runs.values()]
    assert np.abs(np.subtract(*val)).max() < 1e-4
    assert runs["jax"].history[-1]["val_exact_match"] == runs["torch"].history[-1]["val_exact_match"]
    results = json.loads((tmp_path / "jax" / "results.json").read_text())
    assert results["step"] == 12 and "test_exact_match" in results


def test_devices_and_dtypes_are_checked():
    from gptlab.jax.model import jax_device, jax_dtype

    cpu = jax_device("cpu")
    assert (
        cpu.platform == "cpu" and jax_dtype("auto", cpu) == jnp.float32 and jax_dtype("bfloat16", cpu) == jnp.bfloat16
    )
    with pytest.raises(GptlabError, match=r"device 'cuda:3' was asked for but JAX sees 0 GPUs"):
        jax_device("cuda:3")
    with pytest.raises(GptlabError, match=r"device 'cudax' is not supported by the JAX backend \(use auto, cpu"):
        jax_device("cudax")
    with pytest.raises(GptlabError, match=r"float16 is not supported by the JAX backend \(use bfloat16 or float32\)"):
        jax_dtype("float16", cpu)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_decay_groups_decay_what_pytorch_decays(optimizer):
    # one step on zero gradients: AdamW's and Muon's updates are zero, so only weight decay moves a parameter
    from test_trainer_options import decayed_names

    from gptlab.jax.optim import decay_mask

    switches = {"arch": "gpt2", "tie_embeddings": False}  # biases, norm shifts and an untied head
    for groups in ("matrices,embeddings,head", "norms,biases", "embeddings,head", "none"):
        t = TrainConfig(optimizer=optimizer, decay_groups=groups, lr=0.1, weight_decay=0.5)
        model = torch_model(**switches)
        expected = decayed_names(model, t)  # after it, every parameter is non-zero: decay moves each it applies to
        params = from_torch(model)
        opt = Optimizer(t, params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        stepped, _ = opt.update(zeros, opt.init(params), params, np.float32(1.0))
        before, after = to_torch(params, model.cfg), to_torch(stepped, model.cfg)
        assert sorted(n for n in before if not torch.equal(before[n], after[n])) == sorted(expected), groups
    mask = decay_mask(from_torch(torch_model(**switches)), "matrices,embeddings,head")
    assert mask["lm_head.weight"] and mask["blocks"]["attn.q.weight"] and not mask["blocks"]["attn.q.bias"]
