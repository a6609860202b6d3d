from pathlib import Path

import pytest

from gptlab.config import load_config
from gptlab.errors import GptlabError

ROOT = Path(__file__).resolve().parents[1]


def test_preset_and_dotted_overrides():
    cfg = load_config(ROOT / "configs/shakespeare-char.yaml", ["train.max_iters=30", "model.n_layer=2"])
    assert cfg.train.max_iters == 30 and cfg.model.n_layer == 2
    assert cfg.model.block_size == 64  # from the preset
    assert cfg.train.lr == 1.6e-2 and cfg.train.ema == 0.99


def test_nanogpt_style_flat_overrides():
    cfg = load_config(None, ["--n_layer=3", "--max_iters=7", "--learning_rate=0.01", "--batch-size=6"])
    assert (cfg.model.n_layer, cfg.train.max_iters, cfg.train.lr, cfg.train.batch_size) == (3, 7, 0.01, 6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layers=4", "unknown config key 'model.n_layers' in overrides (did you mean 'model.n_layer'?)"),
        ("trian.lr=1", "unknown config key 'trian.lr' in overrides (did you mean 'train.lr'?)"),
        ("n_layers=4", "unknown config key 'n_layers' (did you mean 'model.n_layer'?)"),
        ("seed=3", "override 'seed' is ambiguous (prefix it with its section: train.seed or sample.seed or task.seed)"),
        ("train.optimizer=adam", "train.optimizer has no option 'adam' (did you mean 'adamw'?)"),
        (
            "train.max_iters",
            "override 'train.max_iters' has no value (write it as key=value, e.g. train.max_iters=100)",
        ),
    ],
)
def test_bad_keys_name_the_key_and_suggest(override, message):
    with pytest.raises(GptlabError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_wrong_type_names_the_key():
    with pytest.raises(GptlabError) as e:
        load_config(None, ["model.n_layer=four"])
    assert str(e.value).startswith("config key 'model.n_layer' in overrides has a wrong type: Value 'four'")


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_embed: 64\n")
    with pytest.raises(GptlabError) as e:
        load_config(path)
    assert str(e.value) == f"unknown config key 'model.n_embed' in {path} (did you mean 'model.n_embd'?)"


def test_shape_constraints():
    with pytest.raises(GptlabError) as e:
        load_config(None, ["model.n_embd=100", "model.n_head=3"]).model.resolved()
    assert str(e.value) == "model.n_embd=100 is not divisible by model.n_head=3 (pick n_embd as a multiple of n_head)"


def test_arch_fills_switches():
    gpt2 = load_config(None, ["model.arch=gpt2"]).model.resolved()
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.bias, gpt2.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True,
    )  # fmt: skip
    modern = load_config(None, ["model.n_kv_head=2"]).model.resolved()
    assert (modern.position, modern.norm, modern.mlp, modern.bias, modern.n_kv_head) == (
        "rope", "rmsnorm", "swiglu", False, 2,
    )  # fmt: skip


def test_every_preset_loads():
    presets = {p.stem: load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))}
    assert {"tinystories-bpe", "simplebooks-word", "shakespeare-gpt2"} <= set(presets)
    ts, sb, sg = presets["tinystories-bpe"].data, presets["simplebooks-word"].data, presets["shakespeare-gpt2"].data
    assert (ts.tokenizer, ts.vocab_size, ts.special_tokens, ts.split) == ("bpe", 10000, ["<|endoftext|>"], "document")
    assert (sb.tokenizer, sb.vocab_size, presets["simplebooks-word"].model.block_size) == ("wordpiece", 5000, 128)
    assert sg.tokenizer == "gpt2"
