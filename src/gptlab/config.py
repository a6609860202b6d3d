"""Typed configuration: dataclasses merged from a YAML preset plus dotted overrides.

`load_config("configs/shakespeare-char.yaml", ["train.max_iters=2000"])` returns a `Config`.
Every field is documented where it is declared; unknown keys and wrong types are user errors
that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gptlab.config_names import NanoGPTPending, literal_or_text, nanogpt_train, read_nanogpt_config, suggest
from gptlab.errors import GptlabError

ARCHES = ("modern", "gpt2")
DECAY_KINDS = ("matrices", "embeddings", "head", "norms", "biases")  # what train.decay_groups may name
MAX_SORT_VALUES = 252  # the sort task's symbols (gptlab.data.tasks.SYMBOLS)


@dataclass
class ModelConfig:
    """Shape and switches of the GPT; `arch` fills every switch left at null."""

    arch: str = "modern"  # "modern": RoPE+RMSNorm+SwiGLU, no bias, untied; "gpt2": the GPT-2 block
    # start from trained weights: "scratch", a Hugging Face GPT-2/Llama (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
    # a hub name or a local folder) or a gptlab run directory; the shape then comes from there, and
    # block_size (smaller crops the context), dropout and a grown vocabulary (new special tokens) from here
    init_from: str = "scratch"
    vocab_size: int = 0  # 0 = take it from the prepared data's meta.json
    block_size: int = 256  # context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads (query heads under grouped-query attention)
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; null = n_head
    n_embd: int = 384  # width of the residual stream (d_model)
    d_ff: int | None = None  # MLP hidden size; null = 4*n_embd (gelu) or ~8/3*n_embd (swiglu)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches while training
    position: str | None = None  # "rope" or "learned"
    norm: str | None = None  # "rmsnorm" or "layernorm"
    # "swiglu", "gelu" (tanh approximation: GPT-2), "gelu_exact" (erf: nanoGPT) or "relu2" (relu(x)^2, no gate:
    # modded-nanogpt, nanochat; as wide as gelu's, 4*n_embd)
    mlp: str | None = None
    bias: bool | None = None  # biases in linear layers and norms
    tie_embeddings: bool | None = None  # share the token embedding with the output head
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    # attention and MLP side by side, GPT-J style: x + attn(norm(x)) + mlp(norm(x)); one norm shared by both as in
    # GPT-J, PaLM and Phi (GPT-NeoX's two norms are the rarer form); false: x + attn(norm1(x)), then + mlp(norm2(.))
    parallel_block: bool = False
    # initialise the projections back into the residual stream (attn.out, mlp.down) to zero, so each block starts as
    # the identity (modded-nanogpt, nanochat); false: GPT-2's N(0, 0.02/sqrt(2*n_layer))
    zero_init_out: bool = False
    # cap the logits smoothly at +-c: c * tanh(logits / c) (Gemma 2, modded-nanogpt, nanochat: c 15-30); 0 = off
    logit_softcap: float = 0.0
    # learnable per-layer mixes of the residual stream and the embedding x0 (modded-nanogpt, nanochat): block i reads
    # resid_lambdas[i] * x + x0_lambdas[i] * x0, starting at 1 and 0 (the plain stream)
    x0_lambdas: bool = False
    # a token embedding per layer added to the attention's values, zero at init (value embeddings: modded-nanogpt,
    # nanochat)
    value_embeds: bool = False
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # epsilon of RMSNorm/LayerNorm

    def resolved(self) -> ModelConfig:
        """Return a copy with every null switch filled from `arch` and checked."""
        if self.arch not in ARCHES:
            raise _choice_error("model.arch", self.arch, ARCHES)
        gpt2 = self.arch == "gpt2"
        defaults = {
            "position": "learned" if gpt2 else "rope",
            "norm": "layernorm" if gpt2 else "rmsnorm",
            "mlp": "gelu" if gpt2 else "swiglu",
            "bias": gpt2,
            "tie_embeddings": gpt2,
            "n_kv_head": self.n_head,
        }
        values = asdict(self)
        for key, default in defaults.items():
            if values[key] is None:
                values[key] = default
        if values["d_ff"] is None:
            if values["mlp"] != "swiglu":
                values["d_ff"] = 4 * self.n_embd
            else:  # SwiGLU: 2/3 of 4*n_embd keeps the parameter count, rounded up to a multiple of 64
                values["d_ff"] = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        cfg = ModelConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check choices and shape constraints of a resolved config."""
        for key, choices in (
            ("position", ("rope", "learned")),
            ("norm", ("rmsnorm", "layernorm")),
            ("mlp", ("swiglu", "gelu", "gelu_exact", "relu2")),
        ):
            if getattr(self, key) not in choices:
                raise _choice_error(f"model.{key}", getattr(self, key), choices)
        for key in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "d_ff"):
            if getattr(self, key) < 1:
                raise GptlabError(f"model.{key} must be at least 1", f"got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise GptlabError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                "pick n_embd as a multiple of n_head",
            )
        if self.n_head % self.n_kv_head:
            raise GptlabError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}",
                "pick n_kv_head as a divisor of n_head",
            )
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise GptlabError(
                "rotary positions need an even head size",
                f"n_embd/n_head is {self.n_embd // self.n_head}; change n_embd or n_head",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model.dropout must be in [0, 1), got {self.dropout}", "set e.g. model.dropout=0.1")
        if self.logit_softcap < 0:
            raise GptlabError(
                f"model.logit_softcap must be positive or 0 (off), got {self.logit_softcap}",
                "e.g. model.logit_softcap=15",
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and where its token shards live."""

    # "shakespeare" (built-in complete works), a .txt/.jsonl/.parquet file, a folder, a glob,
    # or a Hugging Face dataset: hf:owner/name[:config], tinystories, openwebtext, simplebooks-92
    source: str = "shakespeare"
    dir: str = "data/shakespeare-char"  # prepared data: shards, meta.json, tokenizer.json
    tokenizer: str = "char"  # char, bpe, wordpiece, gpt2, or the path of an existing tokenizer.json
    vocab_size: int = 8192  # bpe and wordpiece: the vocabulary to train
    max_words: int = 1_000_000  # bpe and wordpiece training: distinct words kept (the rarest dropped beyond)
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])  # the first one ends documents
    gpt2_files: str | None = None  # gpt2: a folder with vocab.json + merges.txt to build it offline
    text_field: str = "text"  # the field holding the text in .jsonl/.parquet/hub rows
    hub_split: str = "train"  # the split of a Hugging Face dataset to read
    # the validation text, read whole (any form `source` takes: valid.txt, a folder, hf:owner/name, tinystories);
    # set, it is the val split and `split`/`val_fraction` are not used; null: val is carved out of `source`
    val_source: str | None = None
    val_hub_split: str = "validation"  # the split read when val_source is a Hugging Face dataset or simplebooks-92
    # in plain-text files, the string between documents (TinyStories' .txt); it and the whitespace next to it are
    # dropped, each document then ends with the end-of-text token; null: each file is one document
    doc_separator: str | None = "<|endoftext|>"
    errors: str = "strict"  # non-UTF-8 bytes: "strict" (an error naming the byte) or "replace"
    split: str = "tail"  # "tail": the last val_fraction of the text (nanoGPT); "document": whole documents
    val_fraction: float = 0.1  # the share of `source` carved out for val (not used with val_source; 0 allowed then)
    shard_tokens: int = 100_000_000  # tokens per shard file
    chunk_chars: int = 1 << 16  # text per encoding task; memory is bounded by this, not the corpus
    workers: int = 0  # encoding processes; 0 = one per CPU core
    dtype: str = "auto"  # token array type: auto (uint16 when the vocabulary fits), uint16, uint32
    # "text": one stream of documents; "sft": prompt/response examples from .jsonl, the loss on responses only
    # (prompts rendered with the tokenizer's chat template when it has one)
    format: str = "text"
    prompt_field: str = "prompt"  # sft: the field holding the prompt
    response_field: str = "response"  # sft: the field holding the response


@dataclass
class TrainConfig:
    """The optimisation loop, its budget, precision, evaluation and checkpoints."""

    out_dir: str = "runs/shakespeare-char"  # the run directory
    seed: int = 1337  # model init, batches and dropout
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    compile: bool | None = None  # torch.compile the model; null = where it pays (CUDA; CPU runs of 1000+ steps)
    batch_size: int = 64  # global sequences per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int | None = None  # sequences per forward on one rank; null = the whole rank batch
    data_mode: str = "random"  # "random" windows (nanoGPT) or "epoch" (every token once per epoch)
    max_iters: int | None = 5000  # budget in optimizer steps; the smallest budget set wins
    max_tokens: int | None = None  # budget in training tokens
    max_epochs: int | None = None  # budget in epochs (in random mode an epoch is eval_interval steps)
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon on hidden matrices, AdamW for the rest)
    lr: float = 1e-3  # peak AdamW learning rate
    muon_lr: float = 0.02  # peak Muon learning rate for hidden matrices
    # Muon's Newton-Schulz iteration: "auto" = bf16 where the device has native bf16 matmuls (CUDA, CPUs with
    # AVX512_BF16 or AMX), fp32 elsewhere (bf16 is emulated there: 12.8x slower steps); float32, bfloat16
    muon_precision: str = "auto"
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW's (and Muon's) decoupled weight decay, on the kinds train.decay_groups names
    # the parameter kinds weight decay applies to, comma-separated: matrices (the blocks' linear weights), embeddings
    # (token and position tables), head (an untied output layer), norms (norm gains and shifts), biases; or none
    decay_groups: str = "matrices,embeddings,head"
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.99  # AdamW's second-moment decay
    schedule: str = "cosine"  # cosine, linear, constant, onecycle, wsd (all with linear warmup)
    warmup_iters: int = 100  # steps of linear warmup to the peak rate (counted in steps in either schedule_unit)
    # "step": the schedule moves every optimizer step; "epoch": the rate is constant within each epoch and moves at
    # its boundaries, as Keras/Lightning's per-epoch schedulers (epoch mode, or max_epochs); the warmup ramps per step
    schedule_unit: str = "step"
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    # exponential moving average of the weights, the decay per optimizer step (e.g. 0.999); 0 = off. The average is
    # what evaluation measures and what model.safetensors holds (best, latest: sample, eval, export read it); the
    # raw weights stay in train_state/ for resuming. Warmed up: the k-th update decays by min(ema, (1+k)/(10+k))
    ema: float = 0.0
    # steps between evaluations, each followed by a checkpoint; null: 250 in random mode (where an epoch is this
    # many steps), only at each epoch's end in epoch mode; set in epoch mode: every N steps into each epoch too
    eval_interval: int | None = None
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between progress-bar updates (plain lines when stderr is not a terminal)
    keep_last: int = 2  # train.save=all: the newest step checkpoints kept (the latest among them) besides the best
    # which checkpoints stay: "all" (the newest train.keep_last and the best), or "best" (save best only: the best
    # and the latest, which a resume needs; keep_last is not used)
    save: str = "all"
    monitor: str = "val_loss"  # the metric that picks the best checkpoint
    monitor_mode: str = "min"  # "min" or "max"
    lora_rank: int = 0  # > 0: train low-rank adapters on attention and MLP projections, the base frozen
    lora_alpha: float = 16.0  # adapters add (lora_alpha / lora_rank) * B @ A to each weight
    lora_dropout: float = 0.0  # dropout on the adapters' input
    early_stop_patience: int = 0  # stop after this many evaluations without train.monitor improving; 0 = never
    early_stop_min_delta: float = 0.0  # the least change of train.monitor that counts as improving
    sample_interval: int = 0  # steps between samples (sample.start, sample.* settings) logged beside the loss; 0 = off
    tensorboard: bool = False  # also log to TensorBoard event files in RUN_DIR/tensorboard (pip install tensorboard)
    wandb: str = "off"  # also log to Weights & Biases: "offline" (files in RUN_DIR/wandb, no network), "online"
    wandb_project: str = "gptlab"  # the W&B project
    require_clean_git: bool = False  # refuse to train from a repository with uncommitted changes (--allow-dirty)
    profile: bool = False  # trace a few steps with the torch profiler into RUN_DIR/profile and print the top ops
    parallel: str = "ddp"  # several ranks (torchrun, --nproc): "ddp" replicates the model, "fsdp" shards it (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before giving up
    backend: str = "torch"  # "torch", or "jax": the JAX model and optax AdamW, one process (pip install gptlab[jax])


@dataclass
class SampleConfig:
    """Defaults for `gptlab sample`."""

    start: str = "\n"  # prompt text, or FILE:path to read it from a file
    allow_special: bool = False  # true: special tokens' text in `start` gets their ids (`--allow-special`)
    num_samples: int = 3  # completions drawn
    max_new_tokens: int = 500  # tokens generated per completion
    temperature: float = 0.8  # 0 = greedy; below 1 sharper, above 1 more random
    top_k: int | None = 200  # sample among the k likeliest tokens; null = all
    top_p: float | None = None  # sample within the smallest set of probability top_p; null = off
    min_p: float | None = None  # drop tokens below min_p times the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the output
    # tokens that end a generation (never shown in the text); null: the tokenizer's end-of-text and the chat
    # template's end of turn. `gptlab import hf` writes the model's own (generation_config.json's eos_token_id)
    end_tokens: list[str] | None = None
    seed: int = 1337  # seeds the sampling


@dataclass
class TaskConfig:
    """A synthetic task (`gptlab prepare` writes its examples; training scores them by exact match)."""

    name: str = "none"  # "none", "adder" (a+b=c) or "sort" (a list of symbols, sorted)
    digits: int = 2  # adder: digits of each operand (the sum is written with digits + 1)
    length: int = 6  # sort: symbols per list
    values: int = 10  # sort: distinct symbols (0-9, a-z, A-Z, then accented Latin letters: at most 252)
    examples: int = 10_000  # distinct examples drawn (all there are, when fewer), split 70/20/10 train/valid/test
    seed: int = 1337  # shuffles and draws the examples
    eval_examples: int = 0  # valid examples scored at each evaluation; 0 = all


@dataclass
class Config:
    """A whole experiment: model, data, training, sampling and an optional synthetic task."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sample": SampleConfig, "task": TaskConfig,
}  # fmt: skip


def _choice_error(key: str, value: Any, choices: tuple[str, ...]) -> GptlabError:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "valid: " + ", ".join(choices)
    return GptlabError(f"{key} has no option '{value}'", hint)


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'train.lr'."""
    return [f"{name}.{f.name}" for name, cls in SECTION_CLASSES.items() for f in fields(cls)]


def _suggest(key: str) -> str:
    return suggest(key, all_keys())  # other tools' names by meaning first, then the closest spelling


def _field(key: str) -> Any:
    """The dataclass field behind a dotted key, or None."""
    section, _, leaf = key.partition(".")
    cls = SECTION_CLASSES.get(section)
    return next((f for f in fields(cls) if f.name == leaf), None) if cls else None


def _flat_key(key: str) -> str:
    """The dotted key of a flat name such as `n_layer`: the one section that has it."""
    owners = [s for s, cls in SECTION_CLASSES.items() if key in {f.name for f in fields(cls)}]
    if len(owners) > 1:
        raise GptlabError(
            f"override '{key}' is ambiguous", "prefix it with its section: " + " or ".join(f"{o}.{key}" for o in owners)
        )
    if not owners:
        raise GptlabError(f"unknown config key '{key}'", _suggest(key))
    return f"{owners[0]}.{key}"


def _none(key: str, origin: str) -> Any:
    """Python's `None` typed as a value: null where the key takes null (`int | None`: no other reading), the text
    'None' for a plain text key, else an error that says so."""
    f = _field(key)
    if f is None or f.type == "str":
        return "None"
    if str(f.type).endswith("| None"):
        return None
    raise GptlabError(
        f"config key '{key}' in {origin} cannot be None",
        f"it takes {f.type}; only keys typed '... | None' take null, see `gptlab config keys {key.split('.')[0]}`",
    )


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{'train.lr': 1} -> {'train': {'lr': 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, leaf = key.partition(".")
        out.setdefault(section, {})[leaf] = value
    return out


def normalize_override(arg: str) -> str:
    """Turn `--key=value`, `--n_layer=4` or `model.n_layer=4` into a dotted `section.key=value` (nanoGPT's flags
    that gptlab spells differently are translated by `load_config`)."""
    text = arg[2:] if arg.startswith("--") else arg
    if "=" not in text:
        raise GptlabError(f"override '{arg}' has no value", "write it as key=value, e.g. train.max_iters=100")
    key, value = text.split("=", 1)
    key = key.replace("-", "_")
    return f"{key if '.' in key else _flat_key(key)}={value}"


def _override(cfg: Any, arg: str, pending: NanoGPTPending) -> Any:
    """Merge one command-line override into `cfg`."""
    text = arg[2:] if arg.startswith("--") else arg
    name, sep, raw = text.partition("=")
    name = name.replace("-", "_")
    if sep and "." not in name:  # nanoGPT's flag, as its configurator reads the value
        mapped = nanogpt_train(name, literal_or_text(raw), arg, pending)
        if mapped is not None:
            return _merge(cfg, OmegaConf.create(_nested(mapped)), "overrides")
    key, raw = normalize_override(arg).split("=", 1)
    if raw == "None":
        value = _none(key, "overrides")
        return _merge(cfg, OmegaConf.create(_nested({key: value})), "overrides")
    try:
        other = OmegaConf.from_dotlist([f"{key}={raw}"])
    except OmegaConfBaseException as e:
        raise GptlabError(f"cannot parse override '{arg}': {str(e).splitlines()[0]}", "write it as key=value") from e
    return _merge(cfg, other, "overrides")


def _merge_nanogpt_file(cfg: Any, path: Path, pending: NanoGPTPending) -> Any:
    """A nanoGPT config/*.py: its assignments (parsed, never run) as flat overrides through nanoGPT's names."""
    for name, value, line in read_nanogpt_config(path):
        origin = f"{path} line {line}"
        mapped = nanogpt_train(name, value, f"{name} = {value!r} ({origin})", pending)
        if mapped is None:
            try:
                mapped = {_flat_key(name): value}
            except GptlabError as e:
                raise GptlabError(f"{e.what} in {origin}", e.fix) from None
        cfg = _merge(cfg, OmegaConf.create(_nested(mapped)), origin)
    return cfg


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        inner = other.get(key) if "." not in key and isinstance(other, DictConfig) else None
        while isinstance(inner, DictConfig) and len(inner):  # name the whole key: 'trainer.max_epochs'
            first = next(iter(inner))
            key, inner = f"{key}.{first}", inner.get(first)
        raise GptlabError(f"unknown config key '{key}' in {origin}", _suggest(key)) from e
    except ValidationError as e:
        key = e.full_key or (str(e.key) if e.key is not None else "a section")
        f = _field(key)
        raise GptlabError(
            f"config key '{key}' in {origin} has a wrong type: {str(e).splitlines()[0]}",
            f"it takes {f.type}, see `gptlab config keys {key.split('.')[0]}`" if f else "see `gptlab config keys`",
        ) from e
    except OmegaConfBaseException as e:
        raise GptlabError(f"invalid config in {origin}: {str(e).splitlines()[0]}", "check the YAML syntax") from e


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Merge defaults <- YAML file (or a nanoGPT config/*.py) <- dotted overrides into a checked `Config`."""
    cfg = OmegaConf.structured(Config)
    pending = NanoGPTPending()  # nanoGPT flags applied once the rest is merged
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"config file '{path}' not found", "pass a YAML file, e.g. configs/shakespeare-char.yaml")
        if path.suffix == ".py":
            cfg = _merge_nanogpt_file(cfg, path, pending)
        else:
            cfg = _merge(cfg, OmegaConf.create(_read_yaml(path)), str(path))
    for arg in overrides or []:
        cfg = _override(cfg, arg, pending)
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    pending.finish(config.train)
    validate(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as e:
        raise GptlabError(f"config file '{path}' is not UTF-8 text", "give a YAML file") from e
    except yaml.YAMLError as e:
        raise GptlabError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}", "fix the YAML") from e
    if not isinstance(data, dict):
        raise GptlabError(f"config file '{path}' is not a mapping", "write sections model:, data:, train:, sample:")
    for section, values in data.items():  # `max_iters: None`, written as Python would
        for leaf, value in values.items() if isinstance(values, dict) else ():
            if value == "None":
                values[leaf] = _none(f"{section}.{leaf}", str(path))
    return data


def validate(cfg: Config) -> None:
    """Check the cross-field rules that types alone cannot express."""
    t = cfg.train
    choices = {
        "train.data_mode": (t.data_mode, ("random", "epoch")),
        "train.optimizer": (t.optimizer, ("adamw", "muon")),
        "train.muon_precision": (t.muon_precision, ("auto", "float32", "bfloat16")),
        "train.schedule": (t.schedule, ("cosine", "linear", "constant", "onecycle", "wsd")),
        "train.dtype": (t.dtype, ("auto", "float32", "bfloat16", "float16")),
        "train.monitor_mode": (t.monitor_mode, ("min", "max")),
        "train.schedule_unit": (t.schedule_unit, ("step", "epoch")),
        "train.save": (t.save, ("all", "best")),
        "data.split": (cfg.data.split, ("tail", "document")),
        "data.errors": (cfg.data.errors, ("strict", "replace")),
        "data.dtype": (cfg.data.dtype, ("auto", "uint16", "uint32")),
        "data.format": (cfg.data.format, ("text", "sft")),
        "train.wandb": (t.wandb, ("off", "offline", "online")),
        "train.parallel": (t.parallel, ("ddp", "fsdp")),
        "train.backend": (t.backend, ("torch", "jax")),
        "task.name": (cfg.task.name, ("none", "adder", "sort")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise _choice_error(key, value, allowed)
    if t.batch_size < 1:
        raise GptlabError(f"train.batch_size must be at least 1, got {t.batch_size}", "set e.g. train.batch_size=32")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise GptlabError("train.micro_batch_size must be at least 1", "set it to null or a positive number")
    if all(b is None for b in (t.max_iters, t.max_tokens, t.max_epochs)):
        raise GptlabError("no training budget is set", "set train.max_iters, train.max_tokens or train.max_epochs")
    for key in ("max_iters", "max_tokens", "max_epochs"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            raise GptlabError(f"train.{key} must be at least 1, got {getattr(t, key)}", "or null to leave it unset")
    if (t.eval_interval is not None and t.eval_interval < 1) or t.eval_iters < 1 or t.log_interval < 1:
        raise GptlabError("train.eval_interval, eval_iters and log_interval must be at least 1", "raise them")
    validate_data(cfg.data)
    if not 0.0 < cfg.data.val_fraction < 1.0 and not (cfg.data.val_source and cfg.data.val_fraction == 0.0):
        raise GptlabError(
            f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}", "e.g. 0.1, or 0 with data.val_source"
        )
    ranges = {
        "train.lr": (t.lr, 0.0, math.inf), "train.muon_lr": (t.muon_lr, 0.0, math.inf),
        "train.beta1": (t.beta1, 0.0, 0.999999), "train.beta2": (t.beta2, 0.0, 0.999999),
        "train.weight_decay": (t.weight_decay, 0.0, math.inf), "train.grad_clip": (t.grad_clip, 0.0, math.inf),
        "train.min_lr_ratio": (t.min_lr_ratio, 0.0, 1.0), "train.decay_fraction": (t.decay_fraction, 0.0, 1.0),
        "train.warmup_iters": (t.warmup_iters, 0, math.inf), "model.rope_theta": (cfg.model.rope_theta, 1e-9, math.inf),
        "model.norm_eps": (cfg.model.norm_eps, 1e-30, 1.0),
    }  # fmt: skip
    for key, (value, low, high) in ranges.items():
        if not low <= value <= high:
            raise GptlabError(f"{key}={value} is out of range", f"use a value in [{low}, {high}]")
    sc = cfg.sample
    check_sampling(sc.num_samples, sc.max_new_tokens, sc.temperature, sc.top_k, sc.top_p, False, sc.min_p,
                   sc.repetition_penalty)  # fmt: skip
    if t.lora_rank < 0 or t.lora_alpha <= 0 or not 0.0 <= t.lora_dropout < 1.0:
        raise GptlabError(
            "train.lora_rank must be 0 (off) or more, lora_alpha > 0 and lora_dropout in [0, 1)", "e.g. lora_rank=8"
        )
    if t.lora_rank and cfg.model.init_from == "scratch":
        raise GptlabError("train.lora_rank is set but there is no base model to adapt", "set model.init_from")
    if t.dist_timeout <= 0:
        raise GptlabError(f"train.dist_timeout must be positive, got {t.dist_timeout}", "e.g. train.dist_timeout=600")
    if not 0.0 <= t.ema < 1.0:
        raise GptlabError(f"train.ema={t.ema} is out of range [0, 1)", "use 0 (off) or a decay such as train.ema=0.999")
    if t.keep_last < 1:
        raise GptlabError("train.keep_last must be at least 1", "keep at least the latest checkpoint")
    decay_kinds(t.decay_groups)
    if t.schedule_unit == "epoch" and t.data_mode == "random" and t.max_epochs is None:
        raise GptlabError(
            "train.schedule_unit=epoch needs epochs, but random mode without train.max_epochs has none",
            "set train.data_mode=epoch (passes over the data), or train.max_epochs (epochs of eval_interval steps)",
        )
    if t.early_stop_patience < 0 or t.early_stop_min_delta < 0 or t.sample_interval < 0:
        raise GptlabError(
            "train.early_stop_patience, early_stop_min_delta and sample_interval must be 0 (off) or more", "raise them"
        )
    validate_task(cfg.task)
    if cfg.model.arch not in ARCHES:
        raise _choice_error("model.arch", cfg.model.arch, ARCHES)


def validate_data(d: DataConfig) -> None:
    """Check the data settings that a prepare would otherwise trip over late."""
    kinds = ("char", "bpe", "wordpiece", "gpt2")
    if d.tokenizer not in kinds and not d.tokenizer.endswith(".json"):
        close = difflib.get_close_matches(d.tokenizer, kinds, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "use char, bpe, wordpiece, gpt2 or a tokenizer.json path"
        raise GptlabError(f"data.tokenizer has no option '{d.tokenizer}'", hint)
    for key in ("shard_tokens", "chunk_chars", "max_words"):
        if getattr(d, key) < 1:
            raise GptlabError(f"data.{key} must be at least 1, got {getattr(d, key)}", "raise it")
    if d.workers < 0:
        raise GptlabError(f"data.workers must be 0 or more, got {d.workers}", "0 uses one per CPU core")
    if len(set(d.special_tokens)) != len(d.special_tokens) or "" in d.special_tokens:
        raise GptlabError(
            f"data.special_tokens has an empty or repeated token: {list(d.special_tokens)}", "list each special once"
        )
    if d.doc_separator == "":
        raise GptlabError("data.doc_separator is empty", "use e.g. '<|endoftext|>', or null for one document per file")


def validate_task(task: TaskConfig) -> None:
    """Check a synthetic task's sizes."""
    limits = {"digits": (task.digits, 1, 18), "length": (task.length, 1, 1000),
              "values": (task.values, 2, MAX_SORT_VALUES), "examples": (task.examples, 10, 10**8),
              "eval_examples": (task.eval_examples, 0, 10**8)}  # fmt: skip
    for key, (value, low, high) in limits.items():
        if not low <= value <= high:
            raise GptlabError(f"task.{key}={value} is out of range", f"use a value in [{low}, {high}]")


def decay_kinds(text: str) -> frozenset[str]:
    """The parameter kinds a train.decay_groups value names ("none": no kind); an unknown one is an error."""
    names = [n.strip() for n in text.split(",")]
    if names == ["none"]:
        return frozenset()
    wrong = [n for n in names if n not in DECAY_KINDS]
    if wrong:
        raise GptlabError(
            f"train.decay_groups has no kind '{wrong[0]}'",
            "list some of " + ", ".join(DECAY_KINDS) + " separated by commas, or none",
        )
    return frozenset(names)


def sampling_problem(
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> tuple[str, str, str] | None:
    """The first sampling value a generator cannot honour, as (key, what is wrong, how to fix); None if all can be."""
    if not (math.isfinite(temperature) and temperature >= 0):
        return "temperature", f"must be a finite number >= 0, got {temperature}", "0 is greedy"
    if top_k is not None and top_k < 1:
        return "top_k", f"must be at least 1, got {top_k}", "or leave it unset"
    if top_p is not None and not 0.0 < top_p <= 1.0:
        return "top_p", f"must be in (0, 1], got {top_p}", "e.g. 0.95, or leave it unset"
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        return "min_p", f"must be in [0, 1], got {min_p}", "e.g. 0.05, or leave it unset"
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        return "repetition_penalty", f"must be a finite number > 0, got {repetition_penalty}", "1.0 is none"
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        return "seed", f"must be in [-2**63, 2**64), got {seed}", "e.g. 1337"
    return None


def check_sampling(
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    flags: bool,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Sampling values a generator can honour, named as CLI flags (`flags`) or as sample.* config keys."""

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else f"sample.{key}"

    if num_samples < 1:
        raise GptlabError(f"{name('num_samples')} must be at least 1, got {num_samples}", "ask for 1 or more samples")
    if max_new_tokens < 0:
        raise GptlabError(f"{name('max_new_tokens')} must be 0 or more, got {max_new_tokens}", "e.g. 500")
    problem = sampling_problem(temperature, top_k, top_p, min_p, repetition_penalty)
    if problem is not None:
        key, what, fix = problem
        raise GptlabError(f"{name(key)} {what}", fix)


def to_yaml(cfg: Config) -> str:
    """The config as YAML text, as written into a run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any], origin: str = "run directory") -> Config:
    """Rebuild a `Config` from a plain dict (e.g. a run's config.yaml)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), origin)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def older_run_overrides(path: str | Path) -> list[str]:
    """Overrides that keep a run directory's config.yaml, written by an older gptlab, meaning what it meant then.

    Before epoch mode evaluated inside epochs (config.yaml has no train.schedule_unit then), it ignored
    train.eval_interval, which every run saved (250 by default): a resume keeps evaluating at epoch ends only."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict) or "schedule_unit" in train:
        return []
    if train.get("data_mode") == "epoch" and train.get("eval_interval") is not None:
        return ["train.eval_interval=null"]
    return []


def read_run_config(path: str | Path) -> Config:
    """The `Config` in a run directory's config.yaml (`path`); damaged content is an error naming the file."""
    path = Path(path)
    fix = "restore the run's config.yaml from a backup, or train the run again"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise GptlabError(f"'{path}' is not UTF-8 text (byte {e.start})", fix) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser gave up, when it knows
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GptlabError(f"'{path}' is not valid YAML: {problem}{where}", fix) from e
    except OSError as e:
        raise GptlabError(f"cannot read '{path}' ({e.strerror or e})", fix) from e
    if not isinstance(data, dict):
        raise GptlabError(f"'{path}' holds no config mapping", fix)
    try:
        return from_dict(data, str(path))
    except OmegaConfBaseException as e:  # a value OmegaConf cannot hold at all (from_dict reports the rest)
        raise GptlabError(f"invalid config in '{path}': {str(e).splitlines()[0]}", fix) from e
