"""Other tools' names for gptlab's settings: hints by meaning, nanoGPT's flags and config files, the key list.

`config.py` imports this module; it imports nothing of gptlab but `errors`, so the config classes come in as
arguments. Names from Hugging Face, litgpt, Lightning and the stories only get a hint (`did you mean
'train.lr'?`): a silent rename would let two vocabularies into one config, and several differ slightly
(a per-device batch, an absolute minimum rate). nanoGPT's flat flags are mapped, value and all, because
its course is run with them (`gptlab train config/train_shakespeare_char.py --max_iters=2000`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import operator
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

# gradient accumulation, which gptlab derives from the global batch and the micro-batch
ACCUMULATION = (
    "train.micro_batch_size",
    "gptlab accumulates when it is below the rank's share of train.batch_size, the global batch",
)
# another tool's name (a flat name or a leaf, lower case) -> (the gptlab key or flag, what differs); hints only
MEANINGS: dict[str, tuple[str, str]] = {
    # Hugging Face TrainingArguments
    "learning_rate": ("train.lr", ""),
    "num_train_epochs": ("train.max_epochs", ""),
    "per_device_train_batch_size": (
        "train.micro_batch_size", "it is sequences per forward on one rank; train.batch_size is the global batch",
    ),
    "gradient_accumulation_steps": ACCUMULATION,
    "warmup_steps": ("train.warmup_iters", ""),
    "warmup_ratio": ("train.warmup_iters", "it is a number of steps"),
    "max_steps": ("train.max_iters", ""),
    "logging_steps": ("train.log_interval", ""),
    "eval_steps": ("train.eval_interval", ""),
    "save_steps": ("train.eval_interval", "a checkpoint is saved at every evaluation"),
    "save_total_limit": ("train.keep_last", "the best checkpoint is kept besides"),
    "seed": ("train.seed", ""),
    "output_dir": ("train.out_dir", ""),
    "lr_scheduler_type": ("train.schedule", ""),
    "max_grad_norm": ("train.grad_clip", ""),
    "adam_beta1": ("train.beta1", ""),
    "adam_beta2": ("train.beta2", ""),
    "optim": ("train.optimizer", ""),
    "bf16": ("train.dtype", "write train.dtype=bfloat16"),
    "fp16": ("train.dtype", "write train.dtype=float16"),
    "torch_compile": ("train.compile", ""),
    "gradient_checkpointing": ("train.activation_checkpointing", ""),
    "metric_for_best_model": ("train.monitor", ""),
    "greater_is_better": ("train.monitor_mode", "write max or min"),
    "early_stopping_patience": ("train.early_stop_patience", ""),
    "early_stopping_threshold": ("train.early_stop_min_delta", ""),
    "report_to": ("train.wandb", "and train.tensorboard=true"),
    "run_name": ("train.out_dir", "a run is named after its folder"),
    "num_hidden_layers": ("model.n_layer", ""),
    "num_attention_heads": ("model.n_head", ""),
    "num_key_value_heads": ("model.n_kv_head", ""),
    "hidden_size": ("model.n_embd", ""),
    "max_position_embeddings": ("model.block_size", ""),
    "n_positions": ("model.block_size", ""),
    "n_ctx": ("model.block_size", ""),
    "tie_word_embeddings": ("model.tie_embeddings", ""),
    "use_parallel_residual": ("model.parallel_block", "one shared norm (GPT-J, Phi); NeoX has two"),
    "parallel_attn": ("model.parallel_block", ""),
    "layer_norm_epsilon": ("model.norm_eps", ""),
    "layer_norm_eps": ("model.norm_eps", ""),
    "rms_norm_eps": ("model.norm_eps", ""),
    "activation_function": ("model.mlp", "swiglu, gelu or gelu_exact"),
    "attn_pdrop": ("model.dropout", "one rate for every dropout"),
    "resid_pdrop": ("model.dropout", "one rate for every dropout"),
    "embd_pdrop": ("model.dropout", "one rate for every dropout"),
    "hidden_dropout_prob": ("model.dropout", ""),
    "num_return_sequences": ("sample.num_samples", ""),
    "prompt": ("sample.start", ""),
    # nanoGPT's flags written with a section (flat, they are mapped)
    "min_lr": ("train.min_lr_ratio", "it is a fraction of train.lr"),
    "lr_decay_iters": ("train.max_iters", "the schedule decays over the whole budget"),
    "decay_lr": ("train.schedule", "constant: no decay"),
    "wandb_log": ("train.wandb", "online or offline"),
    "wandb_run_name": ("train.out_dir", "the W&B run is named after its folder"),
    "always_save_checkpoint": ("train.keep_last", "a checkpoint is saved at every evaluation, the best kept"),
    "dataset": ("data.source", "or data.dir for data already prepared"),
    # litgpt
    "global_batch_size": ("train.batch_size", ""),
    "epochs": ("train.max_epochs", ""),
    "lr_warmup_steps": ("train.warmup_iters", ""),
    "max_norm": ("train.grad_clip", ""),
    "n_query_groups": ("model.n_kv_head", ""),
    "intermediate_size": ("model.d_ff", ""),
    "padded_vocab_size": ("model.vocab_size", ""),
    "rope_base": ("model.rope_theta", ""),
    "norm_class_name": ("model.norm", ""),
    "mlp_class_name": ("model.mlp", ""),
    "precision": ("train.dtype", "float32, bfloat16 or float16"),
    "devices": ("--nproc", ""),
    "eval.interval": ("train.eval_interval", ""),
    "eval.max_iters": ("train.eval_iters", ""),
    # PyTorch Lightning
    "accumulate_grad_batches": ACCUMULATION,
    "gradient_clip_val": ("train.grad_clip", ""),
    "val_check_interval": ("train.eval_interval", ""),
    "log_every_n_steps": ("train.log_interval", ""),
    "limit_val_batches": ("train.eval_iters", ""),
    "num_nodes": ("--nproc", "one node"),
    # the stories and everyday names
    "max_epochs": ("train.max_epochs", ""),
    "num_epochs": ("train.max_epochs", ""),
    "n_epochs": ("train.max_epochs", ""),
    "lr": ("train.lr", ""),
    "optimizer.name": ("train.optimizer", ""),
    "optimizer.type": ("train.optimizer", ""),
    "scheduler": ("train.schedule", ""),
    "lr_scheduler": ("train.schedule", ""),
    "betas": ("train.beta1", "and train.beta2, one number each"),
    "warmup": ("train.warmup_iters", ""),
    "total_steps": ("train.max_iters", ""),
    "num_steps": ("train.max_iters", ""),
    "train_steps": ("train.max_iters", ""),
    "clip_grad_norm": ("train.grad_clip", ""),
    "grad_norm_clip": ("train.grad_clip", ""),
    "patience": ("train.early_stop_patience", ""),
    "min_delta": ("train.early_stop_min_delta", ""),
    "mode": ("train.monitor_mode", ""),
    "save_dir": ("train.out_dir", ""),
    "checkpoint_dir": ("train.out_dir", ""),
    "log_dir": ("train.out_dir", ""),
    "eval_every": ("train.eval_interval", ""),
    "log_every": ("train.log_interval", ""),
    "save_every": ("train.eval_interval", "a checkpoint is saved at every evaluation"),
    "d_model": ("model.n_embd", ""),
    "n_embed": ("model.n_embd", ""),
    "embed_dim": ("model.n_embd", ""),
    "emb_dim": ("model.n_embd", ""),
    "num_decoder_blocks": ("model.n_layer", ""),
    "num_blocks": ("model.n_layer", ""),
    "num_layers": ("model.n_layer", ""),
    "n_layers": ("model.n_layer", ""),
    "num_heads": ("model.n_head", ""),
    "n_heads": ("model.n_head", ""),
    "n_kv_heads": ("model.n_kv_head", ""),
    "dropout_rate": ("model.dropout", ""),
    "context_length": ("model.block_size", ""),
    "context_size": ("model.block_size", ""),
    "seq_len": ("model.block_size", ""),
    "max_seq_len": ("model.block_size", ""),
    "max_seq_length": ("model.block_size", ""),
    "ffn_dim": ("model.d_ff", ""),
    "dim_feedforward": ("model.d_ff", ""),
    "d_hidden": ("model.d_ff", ""),
    "use_bias": ("model.bias", ""),
    "norm_type": ("model.norm", ""),
    "activation": ("model.mlp", "swiglu, gelu or gelu_exact"),
    "positional_encoding": ("model.position", "rope or learned"),
    "train_file": ("data.source", ""),
    "data_path": ("data.source", ""),
    "tokenizer_type": ("data.tokenizer", ""),
    "valid_file": ("data.val_source", ""),
    "validation_file": ("data.val_source", ""),
    # story 1's trainer options (Keras, Lightning)
    "save_best_only": ("train.save", "write train.save=best"),
    "scheduler.interval": ("train.schedule_unit", "step or epoch"),
    "lr_scheduler.interval": ("train.schedule_unit", "step or epoch"),
    "scheduler_interval": ("train.schedule_unit", "step or epoch"),
    "no_decay": ("train.decay_groups", "name the kinds that are decayed"),
}  # fmt: skip


def _hint(target: str, note: str) -> str:
    if target.startswith("--"):
        return f"train on N ranks with `gptlab train {target} N`" + (f" ({note})" if note else "")
    return f"did you mean '{target}'?" + (f" {note}" if note else "")


def suggest(key: str, keys: list[str]) -> str:
    """How to fix an unknown key: its meaning in another tool first, then gptlab's closest spelling."""
    name = key.lower().replace("-", "_")
    section, _, leaf = name.rpartition(".")
    for candidate in (name, leaf):  # the whole dotted name, then its last part
        target, note = MEANINGS.get(candidate, ("", ""))
        if target.startswith("--") or target in keys:  # a field another change removed gets no hint
            return _hint(target, note)
        owners = [k for k in keys if k.endswith("." + candidate)]
        if candidate == leaf and section and len(owners) == 1:  # gptlab's own leaf under another section
            return f"did you mean '{owners[0]}'?"
    sections = sorted({k.split(".")[0] for k in keys})
    near = difflib.get_close_matches(section.split(".")[0], sections, n=1, cutoff=0.5) if section else []
    if near and f"{near[0]}.{leaf}" in keys:  # a misspelt section before a valid leaf
        return f"did you mean '{near[0]}.{leaf}'?"
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.5)
    if not close:  # a misspelt leaf under the right section still deserves a hint
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        close = [leaves[near[0]]] if near else []
    return f"did you mean '{close[0]}'?" if close else "see `gptlab config keys` for the keys"


# nanoGPT's train.py flags whose name is gptlab's own leaf, meaning the same (the flat override resolves them)
NANOGPT_SAME = {
    "out_dir": "train.out_dir", "eval_interval": "train.eval_interval", "log_interval": "train.log_interval",
    "eval_iters": "train.eval_iters", "wandb_project": "train.wandb_project", "batch_size": "train.batch_size",
    "block_size": "model.block_size", "n_layer": "model.n_layer", "n_head": "model.n_head", "n_embd": "model.n_embd",
    "dropout": "model.dropout", "bias": "model.bias", "max_iters": "train.max_iters",
    "weight_decay": "train.weight_decay", "beta1": "train.beta1", "beta2": "train.beta2",
    "grad_clip": "train.grad_clip", "warmup_iters": "train.warmup_iters", "device": "train.device",
    "compile": "train.compile",
}  # fmt: skip
# the others, translated by `nanogpt_train`
NANOGPT_TRANSLATED = (
    "eval_only", "always_save_checkpoint", "init_from", "wandb_log", "wandb_run_name", "dataset",
    "gradient_accumulation_steps", "learning_rate", "decay_lr", "lr_decay_iters", "min_lr", "backend", "dtype",
)  # fmt: skip
TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class NanoGPTPending:
    """nanoGPT flags that need the final config (the last one given wins); `finish` applies them."""

    grad_accum: int | None = None
    decay_lr: bool | None = None
    lr_decay_iters: int | None = None
    min_lr: float | None = None
    wandb_run_name: str | None = None

    def finish(self, t: Any) -> None:
        """Apply them to a `TrainConfig` once every override is merged."""
        if self.decay_lr is not None:  # nanoGPT without decay has no warmup either
            t.schedule, t.warmup_iters = ("cosine", t.warmup_iters) if self.decay_lr else ("constant", 0)
        decays = t.schedule != "constant"
        if self.min_lr is not None and decays:
            if not 0 <= self.min_lr <= t.lr:
                raise GptlabError(
                    f"nanoGPT's min_lr={self.min_lr} is above learning_rate={t.lr}",
                    "gptlab decays to train.lr * train.min_lr_ratio: give min_lr <= learning_rate",
                )
            t.min_lr_ratio = float(f"{self.min_lr / t.lr:.12g}") if t.lr else 0.0
        if self.lr_decay_iters is not None and decays and self.lr_decay_iters != t.max_iters:
            raise GptlabError(
                f"nanoGPT's lr_decay_iters={self.lr_decay_iters} differs from max_iters={t.max_iters}, and gptlab's "
                "schedule decays over the whole budget",
                f"give lr_decay_iters={t.max_iters} too, or max_iters={self.lr_decay_iters}"
                if t.max_iters is not None
                else f"set max_iters={self.lr_decay_iters}",
            )
        if self.grad_accum is not None and self.grad_accum > 1:  # nanoGPT's batch_size is one micro-step's
            if t.micro_batch_size is not None:
                raise GptlabError(
                    "nanoGPT's gradient_accumulation_steps and train.micro_batch_size are both set",
                    "keep one: nanoGPT's batch_size with gradient_accumulation_steps, or gptlab's global "
                    "train.batch_size with train.micro_batch_size",
                )
            t.micro_batch_size, t.batch_size = t.batch_size, t.batch_size * self.grad_accum
        name = self.wandb_run_name
        if name is not None and t.wandb != "off" and name != Path(t.out_dir).name:
            raise GptlabError(
                f"nanoGPT's wandb_run_name='{name}' has no gptlab form here",
                f"the W&B run is named after the run directory: set out_dir=out/{name}",
            )


def _bool(value: Any, shown: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise GptlabError(f"nanoGPT's {shown} is not True or False", "write True or False")


def _number(value: Any, shown: str, kind: type) -> Any:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value < (1 if kind is int else 0):
        raise GptlabError(
            f"nanoGPT's {shown} is not a {'whole number >= 1' if kind is int else 'number >= 0'}", "give one"
        )
    return kind(value)


def _no_form(shown: str, fix: str) -> GptlabError:
    return GptlabError(f"nanoGPT's {shown} has no gptlab form here", fix)


def nanogpt_train(name: str, value: Any, shown: str, pending: NanoGPTPending) -> dict[str, Any] | None:
    """A nanoGPT train.py flag that gptlab spells differently, as gptlab keys and values (`pending` gets those
    that need the final config); None when `name` is no such flag. `shown` is how the user wrote it."""
    if name not in NANOGPT_TRANSLATED:
        return None
    if name == "learning_rate":
        return {"train.lr": value}
    if name == "dataset":  # nanoGPT reads data/<dataset>/
        return {"data.dir": f"data/{value}"}
    if name == "dtype":  # gptlab has two: the token arrays' (data.dtype) and this one
        if value in TRAIN_DTYPES:
            return {"train.dtype": value}
        if value in ("uint16", "uint32"):  # data.dtype's own values: only a section says which is meant
            return None
        raise GptlabError(f"nanoGPT's {shown} is not a training dtype", "write float32, bfloat16 or float16")
    if name == "init_from":
        if value == "resume":
            raise _no_form(shown, "continue a run with `gptlab train --resume RUN_DIR`")
        return {"model.init_from": value}
    if name == "backend":
        if value in ("torch", "jax"):  # gptlab's own train.backend
            return {"train.backend": value}
        raise _no_form(
            shown, "gptlab picks NCCL on CUDA and gloo on CPU itself; start ranks with --nproc N or torchrun, "
            "and train.backend chooses torch or jax",
        )  # fmt: skip
    if name == "eval_only":
        if _bool(value, shown):
            raise _no_form(
                shown, "evaluate a run with `gptlab eval RUN_DIR`; `gptlab import hf gpt2 RUN_DIR` first for GPT-2"
            )
        return {}
    if name == "always_save_checkpoint":  # gptlab saves at every evaluation and always keeps the best
        return {} if _bool(value, shown) else {"train.keep_last": 1}
    if name == "wandb_log":
        return {"train.wandb": "online" if _bool(value, shown) else "off"}
    if name == "wandb_run_name":
        pending.wandb_run_name = str(value)
    elif name == "gradient_accumulation_steps":
        pending.grad_accum = _number(value, shown, int)
    elif name == "decay_lr":
        pending.decay_lr = _bool(value, shown)
    elif name == "lr_decay_iters":
        pending.lr_decay_iters = _number(value, shown, int)
    elif name == "min_lr":
        pending.min_lr = _number(value, shown, float)
    return {}


# nanoGPT's sample.py flags -> the `gptlab sample` option (dest) that takes the value; None: handled below
NANOGPT_SAMPLE = {
    "out_dir": "run_dir", "start": "start", "num_samples": "num_samples", "max_new_tokens": "max_new_tokens",
    "temperature": "temperature", "top_k": "top_k", "seed": "seed", "device": "device", "dtype": "dtype",
    "init_from": None, "compile": None,
}  # fmt: skip


def nanogpt_sample(name: str, value: str, shown: str) -> dict[str, str]:
    """A nanoGPT sample.py flag as {`gptlab sample` option: value}; {} where gptlab does that anyway."""
    if name == "init_from":
        if value == "resume":  # sampling a run directory is what gptlab sample does
            return {}
        raise _no_form(shown, f"make it a run first: `gptlab import hf {value} runs/{value}`, then sample that")
    if name == "compile":  # gptlab sample --compile: the decode step through torch.compile
        return {"compile": "true"} if _bool(literal_or_text(value), shown) else {}
    return {NANOGPT_SAMPLE[name]: value}  # type: ignore[dict-item]


def literal_or_text(text: str) -> Any:
    """A value as nanoGPT's configurator reads it: a Python literal, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv}  # fmt: skip


def _value(node: ast.expr) -> Any:
    """A literal, or arithmetic on numbers (`5 * 8` in nanoGPT's train_gpt2.py); anything else raises ValueError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _value(node.left), _value(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        try:
            return _ARITHMETIC[type(node.op)](left, right)
        except ZeroDivisionError as e:
            raise ValueError("division by zero") from e
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.BinOp):
        return -_value(node.operand)
    return ast.literal_eval(node)


def read_nanogpt_config(path: Path) -> list[tuple[str, Any, int]]:
    """The (name, value, line) assignments of a nanoGPT config/*.py, parsed, never run: a file with anything
    else in it (imports, calls, names) is refused naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"config file '{path}' is not UTF-8 text", "give a nanoGPT config/*.py file") from e
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise GptlabError(f"'{path}' line {e.lineno} is not valid Python: {e.msg}", "fix the file") from e
    lines, found = text.splitlines(), []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, expr = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, expr = node.target.id, node.value
        try:
            if target is None:
                raise ValueError("not an assignment")
            value = _value(expr)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            code = lines[node.lineno - 1].strip()
            code = code if len(code) <= 60 else code[:57] + "..."
            raise GptlabError(
                f"'{path}' line {node.lineno} is not a plain assignment of a value: {code}",
                "gptlab reads nanoGPT config files without running them: write name = a literal (number, string, "
                "True/False, None, list)",
            ) from None
        found.append((target, value, node.lineno))
    return found


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the comment lines right above it and the one beside it."""
    source = inspect.getsource(cls)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.lstrip("# ") != "fmt: skip":
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
    docs = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and comments[line][1]:  # full-line comments directly above
                above.insert(0, comments[line][0])
                line -= 1
            beside = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            docs[node.target.id] = " ".join(above + beside)
    return docs


def _show(value: Any) -> str:
    """A default as one would write it in YAML or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return repr(value)


def key_rows(classes: dict[str, type]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every field of the config sections `classes` (section name -> dataclass)."""
    rows = []
    for section, cls in classes.items():
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            rows.append((f"{section}.{f.name}", str(f.type), _show(default), docs.get(f.name, "")))
    return rows


def describe_keys(classes: dict[str, type], prefix: str | None = None) -> str:
    """`gptlab config keys [PREFIX]`: one line per key with its type, default and doc."""
    rows = key_rows(classes)
    if prefix:
        chosen = [r for r in rows if r[0] == prefix or r[0].startswith(prefix.rstrip(".") + ".")]
        if not chosen:
            keys = [r[0] for r in rows]
            known = "." in prefix or prefix in MEANINGS or any(k.endswith("." + prefix) for k in keys)
            hint = suggest(prefix, keys) if known else "sections: " + ", ".join(classes)
            raise GptlabError(f"no config key or section '{prefix}'", hint)
        rows = chosen
    width = max(len(r[0]) for r in rows)
    kinds = max((len(f"{r[1]} = {r[2]}") for r in rows if len(r[2]) <= 24), default=0)  # long defaults overflow
    lines = []
    for key, kind, default, doc in rows:
        lines.append(f"{key:<{width}}  {f'{kind} = {default}':<{kinds}}  {doc}".rstrip())
    return "\n".join(lines)
