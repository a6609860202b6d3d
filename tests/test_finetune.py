"""Fine-tuning: starting from imported weights (model.init_from), context crop, vocabulary growth, SFT and LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from gptlab.cli import main
from gptlab.data.batches import IGNORE_INDEX, ExampleBatches, load_prepared
from gptlab.data.inspect import inspect_data
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.interop.hf import hf_tokenizer
from gptlab.tokenizers import Tokenizer
from gptlab.train.checkpoint import find_checkpoint, load_run
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A random GPT-2 (3 layers, 48 dims, 64 positions) and a byte-level BPE tokenizer, as a `from_pretrained` folder."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    tokenizer = Tokenizer.train("bpe", [make_text(300, seed=1)], 300, ["<|endoftext|>"])
    torch.manual_seed(0)
    eos = tokenizer.eos_id
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=48, n_layer=3, n_head=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    hf_tokenizer(tokenizer).save_pretrained(folder)
    return folder


def finetune_config(tmp_path: Path, hf_folder: Path, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "new.txt").write_text(make_text(300, seed=7))
    return tiny_config(
        tmp_path, tmp_path / "new.txt", f"model.init_from={hf_folder}", f"data.tokenizer={hf_folder / 'tokenizer.json'}",
        "model.block_size=32", "train.lr=3e-3", *overrides,
    )  # fmt: skip


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


def test_init_from_a_hugging_face_folder_takes_its_shape_crops_the_context_and_lowers_the_loss(tmp_path, hf_folder):
    cfg = finetune_config(tmp_path, hf_folder, "train.max_iters=40")
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True)
    m = trainer.model.cfg
    assert (m.arch, m.n_layer, m.n_embd, m.n_head, m.block_size) == ("gpt2", 3, 48, 3, 32)  # 64 positions cropped
    x = torch.randint(0, m.vocab_size, (2, 32))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.model(x), hf_logits(hf_folder, x), atol=1e-5, rtol=0)
    before = trainer.evaluate()
    trainer.fit()
    assert trainer.history[-1]["val_loss"] < before - 0.5
    saved = load_run(cfg.train.out_dir)[0]
    assert saved.model.init_from == str(hf_folder) and saved.model.block_size == 32


@pytest.mark.parametrize("value_embeds", [False, True])
def test_new_special_tokens_grow_the_vocabulary_of_a_run_directory_base(tmp_path, value_embeds):
    base_cfg = tiny_config(tmp_path / "base", tmp_path / "corpus.txt", "train.max_iters=5",
                           f"model.value_embeds={str(value_embeds).lower()}")  # fmt: skip
    (tmp_path / "corpus.txt").write_text(make_text())
    prepare(base_cfg.data, quiet=True)
    Trainer(base_cfg, quiet=True).fit()
    _, base, base_tok = load_run(base_cfg.train.out_dir)
    run = Path(base_cfg.train.out_dir)
    cfg = tiny_config(
        tmp_path / "ft", tmp_path / "corpus.txt", f"model.init_from={run}", f"data.tokenizer={run / 'tokenizer.json'}",
        "data.special_tokens=[<|endoftext|>,<|user|>]", "train.max_iters=5",
    )  # fmt: skip
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True)
    tokenizer = load_prepared(cfg.data.dir).tokenizer()
    assert tokenizer.special_ids["<|user|>"] == base_tok.vocab_size == base.cfg.vocab_size  # one new id, at the end
    assert trainer.model.cfg.vocab_size == base.cfg.vocab_size + 1
    for name in ("tok_emb", "lm_head"):  # the default block has an untied head: both grow
        grown, old = getattr(trainer.model, name).weight.detach(), getattr(base, name).weight.detach()
        assert torch.equal(grown[:-1], old) and torch.allclose(grown[-1], old.mean(0))
    for new, old in zip(trainer.model.blocks, base.blocks, strict=True) if value_embeds else ():
        grown, trained = new.attn.value_embed.weight.detach(), old.attn.value_embed.weight.detach()
        assert torch.equal(grown[:-1], trained) and not grown[-1].any()  # a new token's value rows start at zero
    trainer.fit()
    argv = ["sample", cfg.train.out_dir, "--start", "ROMEO:<|user|>", "--max-new-tokens", "5", "--allow-special"]
    assert main(argv) == 0  # the new special token's text is its id only when allowed


def test_a_base_with_other_token_ids_or_too_few_positions_is_refused(tmp_path, hf_folder, capsys, monkeypatch):
    cfg = finetune_config(tmp_path, hf_folder, "data.tokenizer=char")
    prepare(cfg.data, quiet=True)
    assert main(["train", "--quiet", *_overrides(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: the data in '{cfg.data.dir}' was prepared with another tokenizer than {hf_folder}'s ("
    )
    assert err.endswith(
        f"tokens have other ids) (prepare the data with data.tokenizer=the tokenizer.json of {hf_folder})\n"
    )
    cfg = finetune_config(tmp_path / "long", hf_folder, "model.block_size=128")
    prepare(cfg.data, quiet=True)
    assert main(["train", "--quiet", *_overrides(cfg)]) == 2
    assert capsys.readouterr().err == (
        f"error: model.block_size=128 is longer than the 64 positions {hf_folder} learned "
        "(set model.block_size to at most 64)\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # a relative path whose first folder exists: a typo, not a hub name
    assert main(["train", "--quiet", *_overrides(cfg), f"model.init_from={tmp_path.name}/typo"]) == 2
    assert capsys.readouterr().err == (
        f"error: no folder '{tmp_path.name}/typo' (check the path, or give a hub name such as gpt2)\n"
    )
    assert main(["train", "--quiet", *_overrides(cfg), "model.init_from=scratch", "train.lora_rank=4"]) == 2
    assert capsys.readouterr().err == (
        "error: train.lora_rank is set but there is no base model to adapt (set model.init_from)\n"
    )


def _overrides(cfg) -> list[str]:
    """A config as command-line overrides (the keys tiny_config and finetune_config set)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    return [
        f"model.init_from={m.init_from}", f"model.block_size={m.block_size}", "model.n_layer=2", "model.n_head=2",
        "model.n_embd=32", f"data.dir={d.dir}", f"data.source={d.source}", f"data.tokenizer={d.tokenizer}",
        f"train.out_dir={t.out_dir}", "train.batch_size=4", "train.max_iters=2", "train.device=cpu",
        "train.compile=false", "train.eval_iters=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_folder) -> tuple[Path, Trainer]:
    tmp = tmp_path_factory.mktemp("lora")
    cfg = finetune_config(tmp, hf_folder, "train.lora_rank=4", "train.lora_alpha=8", "train.max_iters=20")
    prepare(cfg.data, quiet=True)
    return Path(cfg.train.out_dir), Trainer(cfg, quiet=True).fit()


def test_lora_updates_only_adapters_and_checkpoints_only_them(lora_run, hf_folder):
    run, trainer = lora_run
    base = load_file(str(hf_folder / "model.safetensors"))
    names = dict(trainer.model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * 6 * 3  # A and B on q, k, v, out, fc, down in each of 3 layers
    # the frozen weights are still GPT-2's: q is the first third of c_attn (stored transposed by Conv1D)
    q = base["transformer.h.0.attn.c_attn.weight"].T[:48]
    assert torch.equal(names["blocks.0.attn.q.weight"].detach(), q)
    assert all(names[n].detach().abs().sum() > 0 for n in trainable if n.endswith("lora_b"))  # B left zero: moved
    ckpt = find_checkpoint(run, "latest")
    stored = load_file(str(ckpt / "model.safetensors"))
    assert set(stored) == trainable
    adapter_bytes = sum(names[n].numel() for n in trainable) * 4
    size = (ckpt / "model.safetensors").stat().st_size
    assert abs(size - adapter_bytes) <= 0.1 * adapter_bytes, (size, adapter_bytes)


def test_a_lora_run_loads_merged_and_exports_plain_weights(lora_run, tmp_path):
    run, trainer = lora_run
    x = torch.randint(0, trainer.model.cfg.vocab_size, (2, 32))
    trainer.model.load_state_dict(  # the checkpoint's (best) adapters, not the last step's
        {**trainer.model.state_dict(), **load_file(str(find_checkpoint(run, "best") / "model.safetensors"))}
    )
    trainer.model.eval()
    with torch.no_grad():
        adapted = trainer.model(x)
    _, merged, _ = load_run(run)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted, atol=1e-5, rtol=0)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert torch.allclose(hf_logits(tmp_path / "hf", x), adapted, atol=1e-5, rtol=0)


def test_a_lora_run_refuses_a_changed_base(lora_run, hf_folder, tmp_path, capsys):
    import shutil

    run, _ = lora_run
    base, moved = tmp_path / "base", tmp_path / "run"
    shutil.copytree(hf_folder, base)
    model = GPT2LMHeadModel.from_pretrained(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    model.save_pretrained(base)
    shutil.copytree(run, moved)
    (moved / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(hf_folder), str(base)))
    capsys.readouterr()  # transformers' own bars above
    assert main(["sample", str(moved), "--max-new-tokens", "3"]) == 2
    assert capsys.readouterr().err == (
        f"error: the base model '{base}' of the LoRA run '{moved}' is not the one its adapters were trained on "
        "(point model.init_from in its config.yaml at the original base)\n"
    )


def write_examples(path: Path, n: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "the king queen lord good night day love".split()
    rows = []
    for i in range(n):
        a = " ".join(rng.choice(words, 3))
        rows.append({"prompt": f"Q{i % 7}: {a}?\n", "response": f"A: {a[::-1]} {i % 7}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("with_template", [False, True])
def test_sft_masks_everything_but_the_response(tmp_path, hf_folder, with_template):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    if with_template:
        (folder / "chat_template.jinja").write_text(TEMPLATE)
    rows = write_examples(tmp_path / "sft.jsonl")
    cfg = tiny_config(tmp_path, tmp_path / "sft.jsonl", "data.format=sft", f"data.tokenizer={folder / 'tokenizer.json'}",
                      "data.special_tokens=[<|endoftext|>]", "model.block_size=48")  # fmt: skip
    prepare(cfg.data, quiet=True)
    data = load_prepared(cfg.data.dir)
    tok = data.tokenizer()
    assert (Path(cfg.data.dir) / "chat_template.jinja").is_file() == with_template
    ex = data.examples["train"]
    assert len(ex) + len(data.examples["val"]) == len(rows) and len(data.examples["val"]) == 6
    for i in range(len(ex)):
        ids = ex.tokens[ex.offsets[i] : ex.offsets[i + 1]].tolist()
        mask = ex.mask[ex.offsets[i] : ex.offsets[i + 1]].tolist()
        prompt, response = rows[i]["prompt"], rows[i]["response"]
        if with_template:
            prompt = f"<|user|>{prompt}\n<|assistant|>"
            response = f"{response}\n"
        cut = mask.index(1)
        assert mask == [0] * cut + [1] * (len(ids) - cut)
        assert tok.decode(ids[:cut]) == prompt and tok.decode(ids[cut:]) == response + "<|endoftext|>"
    report = inspect_data(cfg.data.dir, windows=1, seed=0)
    n_train = len(rows) - 6
    assert f"train   {n_train:>10}{len(ex.tokens):>12,}{ex.mask.mean():>10.0%}" in report
    shown = int(report.split("--- example ")[1].split(":")[0])
    assert f"prompt:   {('<|user|>' if with_template else '') + rows[shown]['prompt']!r}"[:40] in report
    T = int(np.median(np.diff(ex.offsets)))  # some examples longer than the context, some not
    batches = ExampleBatches(ex, T, 16, "random", 0, pad_id=tok.eos_id)
    x, y = batches.batch(3)
    cut = 0
    for row, i in enumerate(batches.indices(3)):
        ids = ex.tokens[ex.offsets[i] : ex.offsets[i + 1]].astype(np.int64).tolist()
        response = [t for t, m in zip(ids, ex.mask[ex.offsets[i] : ex.offsets[i + 1]]) if m]
        targets = [t for t in y[row].tolist() if t != IGNORE_INDEX]
        held = x[row].tolist()
        assert all(y[row, t] == held[t + 1] for t in range(T - 1) if y[row, t] != IGNORE_INDEX)  # next tokens
        if len(ids) <= T + 1:  # whole: the example, then padding that is never a target
            n = len(ids) - 1
            assert held[:n] == ids[:-1] and set(held[n:]) <= {tok.eos_id} and targets == response
            assert (y[row, n:] == IGNORE_INDEX).all()
        else:  # cut: a prompt's start goes first, and a response keeps its beginning
            cut += 1
            assert 0 < len(targets) and targets == response[: len(targets)]
    assert 0 < cut < len(x)


def test_sft_from_an_imported_model_learns_the_responses(tmp_path, hf_folder):
    write_examples(tmp_path / "sft.jsonl")
    cfg = finetune_config(tmp_path, hf_folder, "data.format=sft", f"data.source={tmp_path / 'sft.jsonl'}",
                          "model.block_size=48", "train.max_iters=40", "train.batch_size=8")  # fmt: skip
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True)
    before = trainer.evaluate()
    trainer.fit()
    assert trainer.history[-1]["val_loss"] < before - 1.0


@pytest.mark.parametrize("preset", ["finetune-gpt2", "sft"])
def test_the_fine_tuning_presets_run_from_a_local_base(tmp_path, hf_folder, preset):
    """The presets as shipped, with the tiny local model in place of the GPT-2 download and a short budget."""
    from gptlab.config import load_config

    root = Path(__file__).parent.parent
    (tmp_path / "new.txt").write_text(make_text(200, seed=3))
    overrides = [
        f"model.init_from={hf_folder}", f"data.tokenizer={hf_folder / 'tokenizer.json'}", f"data.dir={tmp_path / 'data'}",
        f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", "train.compile=false", "train.eval_iters=2",
        "model.block_size=48",
    ]  # fmt: skip
    if preset == "sft":
        overrides += ["train.max_epochs=2"]
    else:
        overrides += [f"data.source={tmp_path / 'new.txt'}", "train.max_iters=4", "train.micro_batch_size=4"]
    cfg = load_config(root / "configs" / f"{preset}.yaml", overrides)
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True).fit()
    assert trainer.step == trainer.total_steps > 0
    assert bool(cfg.train.lora_rank) == (preset == "sft")
    assert main(["sample", cfg.train.out_dir, "--max-new-tokens", "8"]) == 0


@pytest.mark.parametrize("lora", [False, True])
def test_a_fine_tune_stopped_and_resumed_is_bit_identical(tmp_path, hf_folder, lora):
    from test_trainer import StopAt, step_losses

    extra = [
        "train.max_iters=12",
        "model.dropout=0.1",
        *(["train.lora_rank=4", "train.lora_dropout=0.1"] if lora else []),
    ]
    full_cfg = finetune_config(tmp_path / "a", hf_folder, *extra)
    prepare(full_cfg.data, quiet=True)
    full = Trainer(full_cfg, quiet=True).fit()
    cut_cfg = finetune_config(tmp_path / "b", hf_folder, *extra)
    prepare(cut_cfg.data, quiet=True)
    cut = Trainer(cut_cfg, quiet=True)
    cut.callbacks.append(StopAt(7))
    cut.fit()
    assert cut.step == 7
    resumed = Trainer(cut_cfg, resume=True, quiet=True).fit()  # the config as first given, not the run's
    assert resumed.step == 12 and step_losses(resumed.run_dir) == step_losses(full.run_dir)
    ours, theirs = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_tokenizer_file_keeps_its_own_end_of_text(tmp_path, capsys):
    """A Llama-style tokenizer ends text with </s>: the default <|endoftext|> is not quietly added beside it."""
    tokenizer = Tokenizer.train("bpe", [make_text(100)], 300, ["</s>"])
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "corpus.txt").write_text(make_text(100))
    overrides = [f"data.source={tmp_path / 'corpus.txt'}", f"data.dir={tmp_path / 'data'}",
                 f"data.tokenizer={tmp_path / 'tokenizer.json'}"]  # fmt: skip
    assert main(["prepare", "--quiet", *overrides]) == 2
    assert capsys.readouterr().err == (
        f"error: tokenizer '{tmp_path / 'tokenizer.json'}' ends text with '</s>', not '<|endoftext|>' "
        "(list its own first: data.special_tokens=[</s>] (more specials after it are added))\n"
    )
    assert main(["prepare", "--quiet", *overrides, "data.special_tokens=[</s>,<|user|>]"]) == 0
    data = load_prepared(tmp_path / "data")
    assert data.meta["eot_id"] == tokenizer.special_ids["</s>"] and data.meta["vocab_size"] == 301


def test_lora_adapters_stay_on_adamw_without_decay_and_their_settings_are_frozen_on_resume(tmp_path, hf_folder):
    cfg = finetune_config(tmp_path, hf_folder, "train.lora_rank=4", "train.optimizer=muon", "train.max_iters=3")
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True).fit()  # Muon has no matrix left to train: AdamW alone takes the adapters
    assert [type(o).__name__ for o in trainer.optimizers] == ["AdamW"]
    groups = trainer.optimizers[0].param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(36, 0.0)]
    from dataclasses import replace

    rescaled = replace(cfg, train=replace(cfg.train, lora_alpha=64.0))
    with pytest.raises(GptlabError) as e:
        Trainer(rescaled, resume=True, quiet=True)
    assert str(e.value).startswith("cannot resume with changed train.lora_alpha (")
