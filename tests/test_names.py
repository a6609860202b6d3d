"""Users' own names: other tools' keys get hints by meaning, nanoGPT's flags and config files map or are refused
naming the gptlab way, `gptlab config keys` lists every key."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_text

from gptlab.config import all_keys, load_config, normalize_override
from gptlab.config_names import MEANINGS, NANOGPT_SAME, NANOGPT_SAMPLE, NANOGPT_TRANSLATED, suggest
from gptlab.errors import GptlabError


def gptlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *args], cwd=cwd, capture_output=True, text=True)


def error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(GptlabError) as e:
        load_config(path, list(overrides))
    return str(e.value)


# the globals of nanoGPT's train.py and sample.py (karpathy/nanoGPT), each a flag of its configurator
NANOGPT_TRAIN_PY = (
    "out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint", "init_from",
    "wandb_log", "wandb_project", "wandb_run_name", "dataset", "gradient_accumulation_steps", "batch_size",
    "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate", "max_iters", "weight_decay",
    "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "backend", "device",
    "dtype", "compile",
)  # fmt: skip
NANOGPT_SAMPLE_PY = (
    "init_from", "out_dir", "start", "num_samples", "max_new_tokens", "temperature", "top_k", "seed", "device",
    "dtype", "compile",
)  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        # story 1's spellings
        ("trainer.max_epochs=30", "unknown config key 'trainer.max_epochs' in overrides (did you mean 'train.max_epochs'?)"),
        ("optimizer.lr=0.2", "unknown config key 'optimizer.lr' in overrides (did you mean 'train.lr'?)"),
        ("d_model=128", "unknown config key 'd_model' (did you mean 'model.n_embd'?)"),
        ("num_decoder_blocks=5", "unknown config key 'num_decoder_blocks' (did you mean 'model.n_layer'?)"),
        ("model.num_heads=8", "unknown config key 'model.num_heads' in overrides (did you mean 'model.n_head'?)"),
        ("dropout_rate=0.1", "unknown config key 'dropout_rate' (did you mean 'model.dropout'?)"),
        ("context_length=256", "unknown config key 'context_length' (did you mean 'model.block_size'?)"),
        (
            "trainer.gradient_accumulation_steps=4",
            "unknown config key 'trainer.gradient_accumulation_steps' in overrides (did you mean "
            "'train.micro_batch_size'? gptlab accumulates when it is below the rank's share of train.batch_size, "
            "the global batch)",
        ),
        # Hugging Face TrainingArguments and litgpt
        ("num_train_epochs=3", "unknown config key 'num_train_epochs' (did you mean 'train.max_epochs'?)"),
        (
            "per_device_train_batch_size=8",
            "unknown config key 'per_device_train_batch_size' (did you mean 'train.micro_batch_size'? it is "
            "sequences per forward on one rank; train.batch_size is the global batch)",
        ),
        ("training.warmup_steps=10", "unknown config key 'training.warmup_steps' in overrides (did you mean 'train.warmup_iters'?)"),
        ("max_grad_norm=1", "unknown config key 'max_grad_norm' (did you mean 'train.grad_clip'?)"),
        ("output_dir=out", "unknown config key 'output_dir' (did you mean 'train.out_dir'?)"),
        ("train.global_batch_size=64", "unknown config key 'train.global_batch_size' in overrides (did you mean 'train.batch_size'?)"),
        ("optimizer.init_args.lr=1e-3", "unknown config key 'optimizer.init_args.lr' in overrides (did you mean 'train.lr'?)"),
        ("devices=4", "unknown config key 'devices' (train on N ranks with `gptlab train --nproc N`)"),
        # gptlab's own leaf under another section, and no hint at all
        ("model.weight_decay=0", "unknown config key 'model.weight_decay' in overrides (did you mean 'train.weight_decay'?)"),
        ("xyzzy=1", "unknown config key 'xyzzy' (see `gptlab config keys` for the keys)"),
    ],
)  # fmt: skip
def test_foreign_names_get_a_hint_by_meaning(override, message):
    assert error(override) == message


def test_hints_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_epochs: 30\n")
    assert error(path=path) == f"unknown config key 'trainer.max_epochs' in {path} (did you mean 'train.max_epochs'?)"


def test_every_meaning_names_a_key_that_exists():
    keys = all_keys()
    for name, (target, _) in MEANINGS.items():
        assert target.startswith("--") or target in keys, name
        if name not in {k.split(".", 1)[1] for k in keys}:  # a valid leaf would not be asked about
            assert suggest(name, keys).startswith(f"did you mean '{target}'?") or target.startswith("--"), name


def test_none_is_null_where_a_key_takes_null(tmp_path):
    cfg = load_config(None, ["train.max_iters=None", "train.max_epochs=2", "model.mlp=None", "sample.start=None"])
    assert (cfg.train.max_iters, cfg.train.max_epochs, cfg.model.mlp) == (None, 2, None)
    assert cfg.sample.start == "None"  # a text key keeps the text
    assert error("model.n_layer=None") == (
        "config key 'model.n_layer' in overrides cannot be None (it takes int; only keys typed '... | None' take "
        "null, see `gptlab config keys model`)"
    )
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_iters: None\n  max_tokens: 1000\n")
    assert load_config(path).train.max_iters is None


def test_wrong_type_names_the_type_and_the_key_list():
    assert error("model.n_layer=four") == (
        "config key 'model.n_layer' in overrides has a wrong type: Value 'four' of type 'str' could not be converted "
        "to Integer (it takes int, see `gptlab config keys model`)"
    )


def test_config_keys_lists_every_key_with_type_default_and_doc(tmp_path):
    r = gptlab("config", "keys", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == all_keys()
    lr = next(line for line in lines if line.startswith("train.lr "))
    assert lr.split() == ["train.lr", "float", "=", "0.001", "peak", "AdamW", "learning", "rate"]
    init = next(line for line in lines if line.startswith("model.init_from "))
    assert '= "scratch"' in init and "a Hugging Face GPT-2/Llama" in init  # the comment lines above the field
    for line in lines:  # every key is documented where it is declared
        assert len(line.split("  ")) >= 3 and line.split("  ")[-1].strip(), line
    assert gptlab("train", "--help-config", cwd=tmp_path).stdout == r.stdout
    train = gptlab("config", "keys", "train", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in train] == [k for k in all_keys() if k.startswith("train.")]
    one = gptlab("config", "keys", "sample.top_k", cwd=tmp_path).stdout
    assert one.split() == "sample.top_k int | None = 200 sample among the k likeliest tokens; null = all".split()
    r = gptlab("config", "keys", "trainer.max_epochs", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (
        2, "error: no config key or section 'trainer.max_epochs' (did you mean 'train.max_epochs'?)\n"
    )  # fmt: skip


# nanoGPT flag, value as typed -> what it sets in gptlab
NANOGPT_MAPPED = {
    "out_dir=out-x": {"train.out_dir": "out-x"},
    "eval_interval=100": {"train.eval_interval": 100},
    "log_interval=1": {"train.log_interval": 1},
    "eval_iters=200": {"train.eval_iters": 200},
    "eval_only=False": {},
    "always_save_checkpoint=True": {"train.keep_last": 2},
    "always_save_checkpoint=False": {"train.keep_last": 1},  # the latest (to resume) and the best
    "init_from=scratch": {"model.init_from": "scratch"},
    "init_from=gpt2-medium": {"model.init_from": "gpt2-medium"},
    "wandb_log=True": {"train.wandb": "online"},
    "wandb_log=False": {"train.wandb": "off"},
    "wandb_project=owt": {"train.wandb_project": "owt"},
    "wandb_run_name=gpt2": {"train.wandb": "off"},  # W&B off: no effect, as in nanoGPT
    "dataset=shakespeare_char": {"data.dir": "data/shakespeare_char"},
    "gradient_accumulation_steps=4": {"train.batch_size": 256, "train.micro_batch_size": 64},
    "gradient_accumulation_steps=1": {"train.batch_size": 64, "train.micro_batch_size": None},
    "batch_size=12": {"train.batch_size": 12},
    "block_size=1024": {"model.block_size": 1024},
    "n_layer=12": {"model.n_layer": 12},
    "n_head=12": {"model.n_head": 12},
    "n_embd=768": {"model.n_embd": 768},
    "dropout=0.2": {"model.dropout": 0.2},
    "bias=False": {"model.bias": False},
    "learning_rate=6e-4": {"train.lr": 6e-4},
    "max_iters=600000": {"train.max_iters": 600000},
    "weight_decay=0.1": {"train.weight_decay": 0.1},
    "beta1=0.9": {"train.beta1": 0.9},
    "beta2=0.95": {"train.beta2": 0.95},
    "grad_clip=0.0": {"train.grad_clip": 0.0},
    "decay_lr=False": {"train.schedule": "constant", "train.warmup_iters": 0},
    "decay_lr=True": {"train.schedule": "cosine", "train.warmup_iters": 100},
    "warmup_iters=2000": {"train.warmup_iters": 2000},
    "lr_decay_iters=5000": {"train.max_iters": 5000},  # equal to max_iters: the whole budget, as gptlab decays
    "min_lr=1e-4": {"train.min_lr_ratio": 0.1},  # learning_rate 1e-3
    "backend=jax": {"train.backend": "jax"},
    "device=cpu": {"train.device": "cpu"},
    "dtype=float16": {"train.dtype": "float16"},
    "compile=False": {"train.compile": False},
}
NANOGPT_REFUSED = {
    "eval_only=True": "evaluate a run with `gptlab eval RUN_DIR`; `gptlab import hf gpt2 RUN_DIR` first for GPT-2",
    "init_from=resume": "continue a run with `gptlab train --resume RUN_DIR`",
    "backend=nccl": "gptlab picks NCCL on CUDA and gloo on CPU itself; start ranks with --nproc N or torchrun, and "
    "train.backend chooses torch or jax",
}


def value(cfg, key):
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)


@pytest.mark.parametrize("dashes", ["--", ""])
def test_every_nanogpt_train_flag_maps_or_is_refused(dashes):
    assert set(NANOGPT_TRAIN_PY) == set(NANOGPT_SAME) | set(NANOGPT_TRANSLATED)
    covered = {flag.split("=")[0] for flag in [*NANOGPT_MAPPED, *NANOGPT_REFUSED]}
    assert covered == set(NANOGPT_TRAIN_PY)
    for name, key in NANOGPT_SAME.items():  # the same name and meaning: gptlab's own flat override
        assert normalize_override(f"{name}=1").split("=")[0] == key
    for flag, expected in NANOGPT_MAPPED.items():
        cfg = load_config(None, [dashes + flag])
        assert {k: value(cfg, k) for k in expected} == expected, flag
    for flag, fix in NANOGPT_REFUSED.items():
        assert error(dashes + flag) == f"nanoGPT's {dashes}{flag} has no gptlab form here ({fix})"


def test_nanogpt_flags_that_depend_on_others():
    cfg = load_config(None, ["--batch_size=12", "--gradient_accumulation_steps=40", "--learning_rate=6e-4",
                             "--min_lr=6e-5", "--max_iters=600", "--lr_decay_iters=600"])  # fmt: skip
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.min_lr_ratio) == (480, 12, 0.1)
    assert error("--lr_decay_iters=100") == (
        "nanoGPT's lr_decay_iters=100 differs from max_iters=5000, and gptlab's schedule decays over the whole "
        "budget (give lr_decay_iters=5000 too, or max_iters=100)"
    )
    assert load_config(None, ["--decay_lr=False", "--lr_decay_iters=100", "--min_lr=1"]).train.schedule == "constant"
    assert error("--min_lr=0.01") == (
        "nanoGPT's min_lr=0.01 is above learning_rate=0.001 (gptlab decays to train.lr * train.min_lr_ratio: give "
        "min_lr <= learning_rate)"
    )
    assert error("--gradient_accumulation_steps=2", "train.micro_batch_size=8") == (
        "nanoGPT's gradient_accumulation_steps and train.micro_batch_size are both set (keep one: nanoGPT's "
        "batch_size with gradient_accumulation_steps, or gptlab's global train.batch_size with "
        "train.micro_batch_size)"
    )
    assert error("--wandb_log=True", "--wandb_run_name=mini-gpt") == (
        "nanoGPT's wandb_run_name='mini-gpt' has no gptlab form here (the W&B run is named after the run directory: "
        "set out_dir=out/mini-gpt)"
    )
    assert load_config(None, ["--wandb_log=True", "--wandb_run_name=x", "--out_dir=out/x"]).train.wandb == "online"
    assert error("--decay_lr=maybe") == "nanoGPT's --decay_lr=maybe is not True or False (write True or False)"
    assert (
        error("dtype=uint16") == "override 'dtype' is ambiguous (prefix it with its section: data.dtype or train.dtype)"
    )
    assert (
        error("--dtype=bf16") == "nanoGPT's --dtype=bf16 is not a training dtype (write float32, bfloat16 or float16)"
    )


def test_every_nanogpt_sample_flag_has_a_gptlab_form():
    assert set(NANOGPT_SAMPLE_PY) == set(NANOGPT_SAMPLE)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--out_dir=run", "--init_from=gpt2-xl"], "error: nanoGPT's --init_from=gpt2-xl has no gptlab form here (make it a run first: `gptlab import hf gpt2-xl runs/gpt2-xl`, then sample that)\n"),
        (["sample", "out_dir=run", "compile=yes"], "error: nanoGPT's compile=yes is not True or False (write True or False)\n"),
        (["sample", "out_dir=norun", "compile=True"], "error: 'norun' is not a run directory (config.yaml missing) (pass the train.out_dir of a run)\n"),
        (["sample"], "error: no run directory given (write gptlab sample RUN_DIR, or nanoGPT's --out_dir=RUN_DIR)\n"),
        (["sample", "run", "--out_dir=other"], "error: give one run directory (write gptlab sample RUN_DIR, or nanoGPT's --out_dir=RUN_DIR)\n"),
        (["sample", "--out_dir=norun", "--compile=False"], "error: 'norun' is not a run directory (config.yaml missing) (pass the train.out_dir of a run)\n"),
        (["train", "--dirty"], "error: unknown option '--dirty' (did you mean '--allow-dirty'?)\n"),
        (["train", "--max_iters", "5"], "error: unknown option '--max_iters' (overrides are written with '=': --max_iters=VALUE)\n"),
        (["train", "--eval_only=True"], "error: nanoGPT's --eval_only=True has no gptlab form here (evaluate a run with `gptlab eval RUN_DIR`; `gptlab import hf gpt2 RUN_DIR` first for GPT-2)\n"),
        (["train", "--backend=gloo"], "error: nanoGPT's --backend=gloo has no gptlab form here (gptlab picks NCCL on CUDA and gloo on CPU itself; start ranks with --nproc N or torchrun, and train.backend chooses torch or jax)\n"),
    ],
)  # fmt: skip
def test_cli_refusals_are_one_line_exit_2(tmp_path, args, message):
    r = gptlab(*args, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, message)


# nanoGPT's config/train_shakespeare_char.py, the same assignments and comments
SHAKESPEARE_CHAR = """\
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
"""


def test_nanogpt_config_file_reads_as_a_config(tmp_path):
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(SHAKESPEARE_CHAR)
    cfg = load_config(path)
    t, m = cfg.train, cfg.model
    assert (t.out_dir, t.eval_interval, t.eval_iters, t.log_interval, t.keep_last, t.wandb, t.wandb_project) == (
        "out-shakespeare-char", 250, 200, 10, 1, "off", "shakespeare-char",
    )  # fmt: skip
    assert (cfg.data.dir, t.batch_size, t.micro_batch_size) == ("data/shakespeare_char", 64, None)
    assert (m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout) == (256, 6, 6, 384, 0.2)
    assert (t.lr, t.max_iters, t.min_lr_ratio, t.beta2, t.warmup_iters, t.schedule) == (
        1e-3, 5000, 0.1, 0.99, 100, "cosine",
    )  # fmt: skip
    gpt2 = tmp_path / "train_gpt2.py"  # nanoGPT's config/train_gpt2.py writes a product
    gpt2.write_text("batch_size = 12\nblock_size = 1024\ngradient_accumulation_steps = 5 * 8\n")
    assert (load_config(gpt2).train.batch_size, load_config(gpt2).train.micro_batch_size) == (480, 12)


@pytest.mark.parametrize(
    "line",
    [
        "open('MARKER', 'w').write('ran')",
        "import os; os.system('touch MARKER')",
        "wandb_run_name = 'ft-' + str(open('MARKER', 'w'))",
        "n_layer = len(open('MARKER', 'w').name)",
        "eval_iters = __import__('pathlib').Path('MARKER').touch()",
    ],
)
def test_a_config_file_with_code_is_refused_without_running_it(tmp_path, line):
    (tmp_path / "evil.py").write_text(f"n_layer = 2\n{line}\n")
    r = gptlab("train", "evil.py", cwd=tmp_path)
    code = line if len(line) <= 60 else line[:57] + "..."
    assert (r.returncode, r.stderr) == (
        2,
        f"error: 'evil.py' line 2 is not a plain assignment of a value: {code} (gptlab reads nanoGPT config files "
        "without running them: write name = a literal (number, string, True/False, None, list))\n",
    )
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
def test_nanogpt_course_trains_and_samples_through_gptlab(tmp_path):
    """nanoGPT's shakespeare_char config trains through `gptlab train` with nanoGPT-style overrides after it, and
    `gptlab sample` takes sample.py's flags."""
    (tmp_path / "corpus.txt").write_text(make_text())
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train_shakespeare_char.py").write_text(SHAKESPEARE_CHAR)
    r = gptlab("prepare", "config/train_shakespeare_char.py", "data.source=corpus.txt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("prepared: data/shakespeare_char ("), r.stderr
    tiny = ["--device=cpu", "--compile=False", "--eval_iters=2", "--log_interval=1", "--block_size=16",
            "--batch_size=4", "--n_layer=1", "--n_head=2", "--n_embd=16", "--max_iters=4", "--lr_decay_iters=4",
            "--eval_interval=2", "--dropout=0.0", "--warmup_iters=1"]  # fmt: skip
    r = gptlab("train", "config/train_shakespeare_char.py", *tiny, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 4 steps into out-shakespeare-char, val loss ")

    common = ["--max_new_tokens=8", "--temperature=0.0", "--seed=1", "--device=cpu", "--dtype=float32"]
    nano = gptlab("sample", "--out_dir=out-shakespeare-char", "--init_from=resume", "--start=KING:",
                  "--num_samples=1", "--top_k=5", "--compile=False", *common, cwd=tmp_path)  # fmt: skip
    assert nano.returncode == 0, nano.stderr
    ours = gptlab("sample", "out-shakespeare-char", "--start", "KING:", "--num-samples", "1", "--top-k", "5",
                  *common, cwd=tmp_path)  # fmt: skip
    flat = gptlab("sample", "out_dir=out-shakespeare-char", "start=KING:", "num_samples=1", "top_k=5",
                  *(c.removeprefix("--") for c in common), cwd=tmp_path)  # fmt: skip
    assert nano.stdout == ours.stdout == flat.stdout and nano.stdout.startswith("KING:")
    assert len(nano.stdout) == len("KING:") + 8 + 1
