"""Models out to Hugging Face: exported folders load with from_pretrained and compute what gptlab computes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.data.shards import prepare
from gptlab.generate import Generator
from gptlab.interop.hf import from_hf, to_hf
from gptlab.model import GPT
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer


def greedy_hf(hf, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def exported_alike(cfg: ModelConfig) -> tuple[GPT, torch.nn.Module]:
    """A random model of `cfg` and its Hugging Face export, checked for equal logits and 20 equal greedy tokens."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights, so the greedy tokens depend on the whole context
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    hf = to_hf(model)
    x = torch.randint(0, 50, (3, 24))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-5, rtol=0)
    prompt = [3, 1, 4, 1, 5]
    assert greedy_hf(hf, prompt, 20) == Generator(model).generate([prompt], 20, temperature=0)[0]
    return model, hf


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("gpt2", {}),
        ("gpt2", {"mlp": "gelu_exact"}),
        ("gpt2", {"mlp": "relu2"}),
        ("modern", {}),
        ("modern", {"n_kv_head": 1}),
        ("modern", {"mlp": "relu2", "n_kv_head": 1}),  # Arcee: Llama's block with relu(x)^2 and no gate
    ],
)
def test_random_models_convert_with_equal_logits_and_greedy_tokens(arch, extra):
    model, hf = exported_alike(
        ModelConfig(arch=arch, vocab_size=50, block_size=48, n_layer=2, n_head=2, n_embd=32, **extra)
    )
    llama = "ArceeForCausalLM" if extra.get("mlp") == "relu2" else "LlamaForCausalLM"
    assert type(hf).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else llama)
    assert from_hf(hf).cfg == model.cfg


@pytest.mark.parametrize(
    "extra",
    [
        {"arch": "gpt2", "position": "rope"},  # biases, a tied head
        {"arch": "modern", "norm": "layernorm", "mlp": "gelu_exact", "n_kv_head": 1, "rope_theta": 500.0},  # untied
    ],
    ids=["gpt2+rope", "modern+layernorm+gelu_exact+gqa"],
)
def test_parallel_blocks_export_as_phi_with_equal_logits_and_greedy_tokens(extra):
    cfg = ModelConfig(vocab_size=50, block_size=48, n_layer=2, n_head=2, n_embd=32, parallel_block=True, **extra)
    _, hf = exported_alike(cfg)
    assert type(hf).__name__ == "PhiForCausalLM"


def test_parallel_blocks_without_a_hugging_face_form_are_user_errors():
    from gptlab.errors import GptlabError
    from gptlab.interop.hf import hf_architecture

    cases = {
        "modern": "error: model.norm=rmsnorm has no Hugging Face architecture with model.parallel_block=true "
        "(PhiForCausalLM needs model.norm=layernorm; export parallel blocks with RoPE, LayerNorm and GELU, "
        "or train with model.parallel_block=false)",
        "gpt2": "error: model.position=learned has no Hugging Face architecture with model.parallel_block=true "
        "(PhiForCausalLM needs model.position=rope; export parallel blocks with RoPE, LayerNorm and GELU, "
        "or train with model.parallel_block=false)",
    }
    for arch, message in cases.items():
        with pytest.raises(GptlabError) as e:
            hf_architecture(ModelConfig(arch=arch, vocab_size=10, n_head=2, n_embd=16, parallel_block=True))
        assert "error: " + str(e.value) == message


# model.parallel_block exports as Phi (PhiForCausalLM), whose block has RoPE, LayerNorm and GELU
PARALLEL = ("model.arch=gpt2", "model.position=rope", "model.parallel_block=true")


@pytest.fixture(scope="module", params=["gpt2", "modern", "gpt2+lora", "modern+lora", "parallel"])
def trained(request, tmp_path_factory) -> Path:
    """A run of each block trained a few steps by gptlab (+lora: LoRA-tuned from such a run), exported."""
    arch, _, lora = request.param.partition("+")
    tmp = tmp_path_factory.mktemp(request.param)
    (tmp / "corpus.txt").write_text(make_text())
    switches = PARALLEL if arch == "parallel" else (f"model.arch={arch}",)
    cfg = tiny_config(tmp / "base" if lora else tmp, tmp / "corpus.txt", *switches, "model.block_size=64")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    if arch == "parallel":  # the switch is saved with the run and comes back with its checkpoint
        saved, model, _ = load_run(cfg.train.out_dir)
        assert saved.model.parallel_block and model.cfg.parallel_block and not hasattr(model.blocks[0], "norm2")
    if lora:  # adapters on the run above, merged by export
        base = Path(cfg.train.out_dir)
        cfg = tiny_config(tmp, tmp / "corpus.txt", f"model.init_from={base}", f"data.tokenizer={base / 'tokenizer.json'}",
                          "model.block_size=64", "train.lora_rank=4", "train.lr=1e-2")  # fmt: skip
        prepare(cfg.data, quiet=True)
        Trainer(cfg, quiet=True).fit()
        merged, plain = load_run(cfg.train.out_dir)[1].state_dict(), load_run(base)[1].state_dict()
        assert merged.keys() == plain.keys()  # plain weights, and the adapters moved them
        assert not torch.equal(merged["blocks.0.attn.q.weight"], plain["blocks.0.attn.q.weight"])
    assert main(["export", cfg.train.out_dir, str(tmp / "hf")]) == 0
    return tmp


def test_exported_run_loads_with_from_pretrained_and_matches(trained):
    _, model, tokenizer = load_run(trained / "run", "best")
    hf = AutoModelForCausalLM.from_pretrained(trained / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(trained / "hf")
    assert sorted(p.name for p in (trained / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    text = "ROMEO:\nthe king"
    ids = tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([ids])), hf(torch.tensor([ids])).logits, atol=1e-5, rtol=0)
    assert greedy_hf(hf, ids, 20) == Generator(model).generate([ids], 20, temperature=0)[0]


def test_pipeline_text_equals_gptlab_sample(trained):
    generate = pipeline("text-generation", model=str(trained / "hf"))
    theirs = generate("ROMEO:", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    ours = subprocess.run(
        [sys.executable, "-m", "gptlab", "sample", str(trained / "run"), "--start", "ROMEO:", "--num-samples", "1",
         "--max-new-tokens", "30", "--temperature", "0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert theirs + "\n" == ours


def test_switches_without_a_hugging_face_architecture_are_user_errors(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(make_text(50))
    cfg = tiny_config(tmp_path, tmp_path / "corpus.txt", "model.qk_norm=true", "train.max_iters=2")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    assert main(["export", cfg.train.out_dir, str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        "error: model.qk_norm=true has no Hugging Face architecture here (train with model.qk_norm=false)\n"
    )
    assert not (tmp_path / "hf").exists()
    cases = {
        ("position=learned", "norm=rmsnorm"): "error: model.norm=rmsnorm has no Hugging Face architecture with "
        "model.position=learned (GPT2LMHeadModel needs model.norm=layernorm; export models whose switches match "
        "GPT-2 or Llama)",
        ("arch=gpt2", "n_kv_head=1"): "error: model.n_kv_head=1 (grouped-query attention) has no GPT-2 form "
        "(use model.n_kv_head=null)",
        ("arch=gpt2", "logit_softcap=15"): "error: model.logit_softcap=15 has no Hugging Face architecture here "
        "(train with model.logit_softcap=0)",
        ("mlp=relu2", "logit_softcap=30"): "error: model.logit_softcap=30 has no Hugging Face architecture here "
        "(train with model.logit_softcap=0)",
        ("x0_lambdas=true",): "error: model.x0_lambdas=true has no Hugging Face architecture here "
        "(train with model.x0_lambdas=false)",
        ("arch=gpt2", "value_embeds=true"): "error: model.value_embeds=true has no Hugging Face architecture here "
        "(train with model.value_embeds=false)",
    }
    from gptlab.errors import GptlabError
    from gptlab.interop.hf import hf_architecture

    for switches, message in cases.items():
        kwargs = dict(s.split("=") for s in switches)
        kwargs = {k: (True if v == "true" else int(v) if v.isdigit() else v) for k, v in kwargs.items()}
        with pytest.raises(GptlabError) as e:
            hf_architecture(ModelConfig(vocab_size=10, n_head=2, n_embd=16, **kwargs))
        assert "error: " + str(e.value) == message


def save_hf(tmp: Path, kind: str, tokenizer) -> Path:  # noqa: ANN001
    """A random-weight transformers model of `kind` with `tokenizer`, saved as a local folder (no download)."""
    from transformers import ArceeConfig, ArceeForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from gptlab.interop.hf import hf_tokenizer

    torch.manual_seed(1)
    v = tokenizer.vocab_size
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                        bos_token_id=None, eos_token_id=None))  # fmt: skip
    else:  # Arcee: Llama's block with relu(up(x))^2 and no gate
        config, model = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (ArceeConfig, ArceeForCausalLM)
        hf = model(config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_theta=500.0, bos_token_id=None, eos_token_id=None))  # fmt: skip
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4 if p.dim() == 2 else 1)
    folder = tmp / f"hf-{kind}"
    hf.save_pretrained(folder)
    hf_tokenizer(tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "llama", "arcee"])
def test_hugging_face_models_import_with_equal_logits_and_greedy_tokens(kind, tmp_path, capsys):
    from gptlab.tokenizers import Tokenizer

    tokenizer = Tokenizer.train("bpe", [make_text(100)], 300)
    folder = save_hf(tmp_path, kind, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert main(["import", "hf", str(folder), str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == f"imported {folder} into {tmp_path / 'run'} (gptlab sample {tmp_path / 'run'})\n"
    cfg, model, tok = load_run(tmp_path / "run")
    assert cfg.model.arch == ("gpt2" if kind == "gpt2" else "modern")
    assert cfg.model.mlp == {"gpt2": "gelu", "llama": "swiglu", "arcee": "relu2"}[kind]
    ids = tok.encode("ROMEO:\nthe king")
    assert ids == tokenizer.encode("ROMEO:\nthe king")
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([ids])), hf(torch.tensor([ids])).logits, atol=1e-5, rtol=0)
    assert greedy_hf(hf, ids, 20) == Generator(model).generate([ids], 20, temperature=0)[0]
    # and back out again: the round trip keeps the weights
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.allclose(again(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits, atol=1e-5)


def test_import_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["import", "hf", "nobody/no-such-model", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not load 'nobody/no-such-model' (") and err.endswith(
        f"(check the name, or download the model where there is a network and pass its folder: "
        f"gptlab import hf ./no-such-model {tmp_path / 'run'})\n"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["import", "hf", str(tmp_path), str(tmp_path / "full")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: '{tmp_path / 'full'}' is not empty (give a new folder, or pass --overwrite)\n"
    )
    assert main(["import", "hf", str(tmp_path), str(tmp_path / "full" / "x")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: '{tmp_path / 'full' / 'x'}' is a file (give a folder for the run directory)\n"
    )


def test_import_overwrite_replaces_the_old_run(tmp_path):
    from gptlab.tokenizers import Tokenizer

    tokenizer = Tokenizer.train("bpe", [make_text(50)], 280)
    gpt2, llama = save_hf(tmp_path, "gpt2", tokenizer), save_hf(tmp_path, "llama", tokenizer)
    assert main(["import", "hf", str(gpt2), str(tmp_path / "run")]) == 0
    assert main(["import", "hf", str(llama), str(tmp_path / "run"), "--overwrite"]) == 0
    cfg, model, _ = load_run(tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(llama).eval()
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert cfg.model.arch == "modern" and torch.allclose(model(x), hf(x).logits, atol=1e-5)


def test_exported_config_and_generation_config_agree_on_end_of_text(trained):
    import json

    config = json.loads((trained / "hf" / "config.json").read_text())
    generation = json.loads((trained / "hf" / "generation_config.json").read_text())
    _, _, tokenizer = load_run(trained / "run")
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_id
    assert config.get("bos_token_id") is None


@pytest.mark.parametrize(
    "kind, setting, message",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "this GPT-2 checkpoint scales attention differently"),
        ("gpt2", {"scale_attn_weights": False}, "this GPT-2 checkpoint scales attention differently"),
        ("llama", {"hidden_act": "gelu"}, "this Llama checkpoint's MLP uses gelu, gptlab's SwiGLU uses silu"),
    ],
)
def test_checkpoints_gptlab_cannot_reproduce_are_refused(kind, setting, message):
    from transformers import GPT2Config, LlamaConfig

    from gptlab.errors import GptlabError
    from gptlab.interop.hf import model_config_of

    config = GPT2Config(n_layer=1, **setting) if kind == "gpt2" else LlamaConfig(num_hidden_layers=1, **setting)
    with pytest.raises(GptlabError) as e:
        model_config_of(config)
    assert str(e.value).startswith(message)


def test_import_folder_errors(tmp_path, capsys):
    assert main(["import", "hf", "./no-such-folder", str(tmp_path / "run")]) == 2
    assert (
        capsys.readouterr().err
        == "error: no folder './no-such-folder' (check the path, or give a hub name such as gpt2)\n"
    )
    (tmp_path / "empty").mkdir()
    assert main(["import", "hf", str(tmp_path / "empty"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not load '{tmp_path / 'empty'}' (")
    assert err.endswith("(the folder needs config.json of a GPT-2 or Llama model, its weights and tokenizer.json)\n")
    assert not (tmp_path / "run").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("keep me")
    assert main(["import", "hf", str(tmp_path / "empty"), str(tmp_path / "notes"), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: '{tmp_path / 'notes'}' holds files but is not a run directory (give a new or empty folder)\n"
    )
    assert (tmp_path / "notes" / "notes.txt").read_text() == "keep me"


def test_an_interrupted_export_leaves_nothing(trained, tmp_path, monkeypatch):
    import gptlab.interop.hf as hf
    import gptlab.interop.runs as interop

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "hf_tokenizer", lambda *args: type("T", (), {"save_pretrained": broken})())
    with pytest.raises(KeyboardInterrupt):
        interop.export(trained / "run", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
