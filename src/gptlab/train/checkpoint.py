"""Checkpoints in a run directory, written atomically and loaded without unpickling objects; what a run starts from.

Layout: checkpoints/step_N/{model.safetensors, meta.json, state.pt, train_state/} plus the pointer files
`latest` and `best`, each holding a folder name. model.safetensors holds the whole weights that sample, serve
and export read; train_state/ holds what a resume needs of the model and optimizers, written by
`torch.distributed.checkpoint` (each rank its own shards under FSDP) and readable by any number of ranks;
state.pt holds the step, the RNG state of every rank and the history. Run directories are shared, so nothing read
from one may run code: weights are safetensors, state.pt is read with `torch.load(weights_only=True)` and
train_state/ through `gptlab.safe_pickle` (torch's own reader would unpickle it whole).
A checkpoint is built in a temporary folder, each file fsynced, then renamed into place; the pointers are replaced
last. A crash at any moment leaves the previous checkpoint and pointers intact; pruning renames a folder to a trash
name before deleting it, and a resume discards step folders newer than `latest` (renamed in, never pointed at); a
resume from an older checkpoint (`--checkpoint step_N`) moves the later ones to RUN/set_aside/ instead (`set_aside`).
A LoRA run's checkpoints hold only its adapters; `load_run` rebuilds
its base from `model.init_from` and merges them in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from gptlab.chat import ChatTemplate, load_chat_template
from gptlab.config import Config, ModelConfig, read_run_config
from gptlab.errors import GptlabError
from gptlab.interop.hf import load_pretrained, pretrained_config
from gptlab.lora import add_lora, is_adapter, merge_lora
from gptlab.model import GPT
from gptlab.safe_pickle import (
    RefusedPickle,
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_dcp_metadata,
    weights_only_refusal,
)
from gptlab.tokenizers import Tokenizer
from gptlab.train.distributed import SINGLE, Dist, is_sharded, load_full_state, lost_peer

FORMAT_VERSION = 2  # 2: the model and optimizer state for resuming moved from state.pt to train_state/
READABLE_VERSIONS = (1, 2)  # the weights of both are read; only version 2 resumes
WEIGHTS, STATE, META, TRAIN_STATE = "model.safetensors", "state.pt", "meta.json", "train_state"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_pointer(path: Path, target: str) -> None:
    """Atomically make the pointer file `path` name `target`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def read_pointer(path: Path) -> str | None:
    """The folder name a pointer file (`latest`, `best`) holds, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(
            f"the pointer file '{path}' is unreadable ({type(e).__name__})",
            f"write the name of one of its checkpoint folders into it, e.g. `echo step_500 > {path}`",
        ) from e


def _stored(model: GPT, state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a state dict that a checkpoint stores: a tied head once, as the embedding; with LoRA, the
    adapters only (the frozen base is model.init_from's, not this run's to store)."""
    state = dict(state)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if any(is_adapter(k) for k in state):
        state = {k: v for k, v in state.items() if is_adapter(k)}
    return state


def model_tensors(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to store (of `state`, the model's whole state dict, if given), on the CPU."""
    stored = _stored(model, model.state_dict() if state is None else state)
    return {k: v.detach().contiguous().cpu() for k, v in stored.items()}


def load_model_tensors(model: GPT, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Load weights into `model` (sharding them if FSDP has), turning any name or shape mismatch into a user error."""
    expected = {k: v.shape for k, v in _stored(model, model.state_dict()).items()}  # global shapes under FSDP
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k]]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape of {wrong[0]}"
        )
        raise GptlabError(
            f"checkpoint '{origin}' does not match the model config: {detail}",
            "load it with the config.yaml of the run that wrote it",
        )
    if is_sharded(model):
        if "tok_emb.weight" in tensors and model.cfg.tie_embeddings:  # the sharded loader wants both names
            tensors = {**tensors, "lm_head.weight": tensors["tok_emb.weight"]}
        load_full_state(model, tensors)
    else:
        model.load_state_dict(tensors, strict=False)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch and cuda as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    weights: dict[str, torch.Tensor] | None,
    state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    train_state: dict[str, Any] | None = None,
    d: Dist = SINGLE,
    best: bool = False,
) -> Path:
    """Write checkpoints/step_N atomically and point `latest` (and with `best`, `best`) at it.

    Every rank calls this: rank 0 writes `weights`, `state` and `meta`, every rank its part of `train_state`
    (`training_state`; None for a checkpoint that holds weights only, such as an imported model).
    """
    name = f"step_{step}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    exists = final.exists()
    d.barrier()  # every rank has looked before rank 0 may create it
    try:
        if not exists:
            _write(final, tmp, weights, state, {"step": step, **(meta or {})}, train_state, d)
        if d.is_main:
            write_pointer(ckpt_root / "latest", name)
            if best:
                write_pointer(ckpt_root / "best", name)
    # safetensors and torch.save report a failed write as SafetensorError and RuntimeError ("... failed writing")
    except (OSError, CheckpointException, SafetensorError, RuntimeError) as e:
        if d.world > 1 and isinstance(e, RuntimeError) and lost_peer(e):
            raise  # another rank is gone: the trainer says so
        if d.is_main:  # the half-built folder goes; a pointer never names it
            shutil.rmtree(tmp, ignore_errors=True)
            for pointer in ("latest", "best"):
                (ckpt_root / f".{pointer}.tmp").unlink(missing_ok=True)
        raise GptlabError(
            f"could not write checkpoint '{final}' ({_cause(e)})",
            "free disk space or fix the folder's permissions; the previous checkpoint is kept",
        ) from e
    d.barrier()  # no rank reads the pointers before they are written
    return final


def _write(
    final: Path,
    tmp: Path,
    weights: dict[str, torch.Tensor] | None,
    state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    train_state: dict[str, Any] | None,
    d: Dist,
) -> None:
    """Build the checkpoint in `tmp`, then rename it to `final` (see `save_checkpoint`)."""
    ckpt_root = final.parent
    if d.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # the leftover of a crashed write
            shutil.rmtree(tmp)
        tmp.mkdir()
    d.barrier()
    if train_state is not None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(train_state, checkpoint_id=tmp / TRAIN_STATE, no_dist=d.world == 1)  # fsyncs its files
    if d.is_main:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
        for f in (WEIGHTS, STATE, META):
            _fsync_file(tmp / f)
        tmp.rename(final)
        _fsync_dir(ckpt_root)


def _inner(e: BaseException) -> BaseException:
    """The first failure inside a `torch.distributed.checkpoint` error (which gathers every rank's)."""
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e


def _cause(e: BaseException) -> str:
    """The first failure inside a `torch.distributed.checkpoint` error, in one short line."""
    e = _inner(e)
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def _refused(path: Path, file: str, reason: str) -> GptlabError:
    """The error for a checkpoint file that asked to build objects no checkpoint holds (see gptlab.safe_pickle)."""
    return GptlabError(
        f"checkpoint '{path}' was refused: {file} holds objects no checkpoint holds, such as code ({reason}); "
        "nothing of it was run",
        "resume only checkpoints from a source you trust, or pick another checkpoint",
    )


def training_state(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], ema: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """What a resume needs of the model and optimizers, keyed by parameter name (not by rank or position), so any
    number of ranks, with DDP or FSDP, can read it; a LoRA run's frozen base is left out. `ema`: the weights' moving
    average by parameter name (train.ema, `EMA.state_dict()`), stored as "ema" beside them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizers, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optim": optim_state}
    if ema is not None:
        state["ema"] = ema
    return state


def load_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    d: Dist = SINGLE,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load a checkpoint's train_state into `model` and `optimizers`, resharded for this run's ranks; with `ema`
    (the tensors of `EMA.state_dict()`, a checkpoint that holds them: meta.json's "ema"), the average in place too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (path / TRAIN_STATE).is_dir():
        raise GptlabError(
            f"checkpoint '{path}' holds weights only, not the optimizer state a resume needs (it was imported, "
            "or written by gptlab before format 2)",
            f"start a new run from its weights with model.init_from={path.parent.parent}",
        )
    state = training_state(model, optimizers, ema)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # read on its own first: dcp.load logs two tracebacks for a damaged one before it fails
            read_dcp_metadata(path / TRAIN_STATE)
            reader = SafeFileSystemReader(path / TRAIN_STATE)  # torch's own reader would unpickle planted code
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=d.world == 1)
    except (Exception, CheckpointException) as e:  # dcp gathers every rank's failure into one BaseException
        if d.world > 1 and lost_peer(_inner(e)):
            raise  # another rank is gone: the trainer says so
        if isinstance(_inner(e), RefusedPickle):
            raise _refused(path, TRAIN_STATE, str(_inner(e))) from e
        raise GptlabError(
            f"checkpoint '{path}' does not match this run or is damaged: {TRAIN_STATE} unreadable ({_cause(e)})",
            "resume with the config of the run that wrote it, or pick an older checkpoint",
        ) from e
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # a LoRA run's frozen base is not in it
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def step_folders(ckpt_root: Path) -> list[Path]:
    """The step_N folders of a checkpoints folder, oldest first."""
    steps = (p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    return sorted(steps, key=lambda p: int(p.name[5:]))


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete step folders beyond the newest `keep_last`, never the one `best` names."""
    keep = {read_pointer(ckpt_root / "best"), read_pointer(ckpt_root / "latest")}
    steps = step_folders(ckpt_root)
    for p in steps[:-keep_last]:
        if p.name not in keep:
            discard(p)
    for p in [*ckpt_root.glob(".tmp-step_*"), *ckpt_root.glob(".trash-step_*")]:  # leftovers of a crash
        shutil.rmtree(p, ignore_errors=True)


def discard(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden trash name first, so a kill midway leaves no torn step_N."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def drop_after(ckpt_root: Path, step: int) -> list[str]:
    """Discard the step folders newer than `step` (the one a resume starts from); returns their names.

    They were renamed into place by a run killed before it pointed `latest` at them: the resumed run's own
    trajectory (with a changed budget, another one) must write those steps afresh, not find them already there.
    """
    newer = [p for p in ckpt_root.glob("step_*") if p.name[5:].isdigit() and int(p.name[5:]) > step and p.is_dir()]
    for p in sorted(newer):
        discard(p)
    return sorted(p.name for p in newer)


def resume_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint folder `gptlab train --resume RUN --checkpoint WHICH` starts from: latest, best or step_N."""
    root = run_dir / "checkpoints"
    pointers = {p: read_pointer(root / p) for p in ("latest", "best")}
    names = [f"{p} ({n})" for p, n in pointers.items() if n] + [p.name for p in step_folders(root)]
    fix = "use one of " + ", ".join(names) if names else "train it first"
    if which not in pointers and not re.fullmatch(r"step_\d+", which):
        raise GptlabError(f"--checkpoint '{which}' names no checkpoint (latest, best or step_N)", fix)
    name = pointers[which] if which in pointers else which
    if name is None or not (root / name).is_dir():
        raise GptlabError(f"run '{run_dir}' has no checkpoint {which}", fix)
    return root / name


def set_aside(run_dir: Path, step: int, best: str | None) -> tuple[Path, list[str]]:
    """Move what a run wrote after `step` out of a resume from that older checkpoint's way, nothing deleted.

    The newer step folders are renamed into RUN/set_aside/after_step_N[-k]/checkpoints/ with copies of the pointers,
    metrics.jsonl and history.json (the resumed run truncates and rewrites them) and the results.json of a finished
    run; then `latest` names step_N and `best` the best as of step N (`best`; the pointer goes when it was pruned).
    A crash midway leaves every folder in one of the two places. Returns the folder and the step folders moved."""
    root = run_dir / "checkpoints"
    aside = run_dir / "set_aside" / f"after_step_{step}"
    k = 1
    while aside.exists():
        k += 1
        aside = aside.with_name(f"after_step_{step}-{k}")
    (aside / "checkpoints").mkdir(parents=True)
    copies = {root / "latest": "checkpoints/latest", root / "best": "checkpoints/best",
              run_dir / "metrics.jsonl": "metrics.jsonl", run_dir / "history.json": "history.json"}  # fmt: skip
    for src, dst in copies.items():
        if src.is_file():
            shutil.copy2(src, aside / dst)
    if (run_dir / "results.json").is_file():  # a finished run's scores: not this trajectory's any more
        (run_dir / "results.json").rename(aside / "results.json")
    newer = [p for p in step_folders(root) if int(p.name[5:]) > step]
    for p in newer:
        p.rename(aside / "checkpoints" / p.name)
    _fsync_dir(root)
    write_pointer(root / "latest", f"step_{step}")
    if best is not None and (root / best).is_dir():
        write_pointer(root / "best", best)
    else:
        (root / "best").unlink(missing_ok=True)
    return aside, [p.name for p in newer]


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """The checkpoint folder for `which`: 'latest', 'best' or a folder name like 'step_200'."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise GptlabError(f"run directory '{run_dir}' not found", "train a model first with `gptlab train`")
    name = read_pointer(root / which) if which in ("latest", "best") else which
    if name is None:
        raise GptlabError(f"run '{run_dir}' has no '{which}' checkpoint", "train longer, or pick another checkpoint")
    path = root / name
    if not path.is_dir():
        raise GptlabError(f"checkpoint '{path}' is missing", "pick another checkpoint, e.g. --checkpoint latest")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, checked for a format this version reads."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise GptlabError(f"checkpoint '{path}' is corrupted: meta.json unreadable", "pick an older checkpoint") from e
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise GptlabError(
            f"checkpoint '{path}' has format version {meta.get('format_version')}, expected {FORMAT_VERSION}",
            "use the gptlab version that wrote it",
        )
    return meta


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint folder."""
    try:
        return load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise GptlabError(
            f"checkpoint '{path}' is corrupted: {WEIGHTS} unreadable ({e})", "pick an older checkpoint"
        ) from e


def load_state(path: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder, loaded with weights_only=True."""
    try:
        return torch.load(path / STATE, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... on damaged files
        refusal = weights_only_refusal(e)  # torch's restricted unpickler refused an object: nothing was built
        if refusal is not None:
            raise _refused(path, STATE, refusal) from e
        raise GptlabError(f"checkpoint '{path}' is corrupted: {STATE} unreadable", "pick an older checkpoint") from e


@dataclass
class Pretrained:
    """What `model.init_from` names: a trained model, its tokenizer and its chat template (if any)."""

    model: GPT
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    origin: str
    end_tokens: list[str] | None = None  # the tokens that end its generations (`sample.end_tokens`), if it names any


def load_init(init_from: str) -> Pretrained:
    """The model a run starts from: a gptlab run directory (its best checkpoint) or a Hugging Face GPT-2/Llama."""
    path = Path(init_from).expanduser()
    if (path / "config.yaml").is_file():
        cfg, model, tokenizer = load_run(path, "best")
        return Pretrained(model, tokenizer, load_chat_template(path, tokenizer), init_from, cfg.sample.end_tokens)
    if path.is_dir() and not (path / "config.json").is_file():
        raise GptlabError(
            f"model.init_from '{init_from}' is neither a gptlab run directory nor a Hugging Face model folder",
            "give a run directory (with config.yaml), a folder with config.json, or a hub name such as gpt2",
        )
    model, tokenizer, template, ends = load_pretrained(init_from, "model.init_from={folder}")
    return Pretrained(model, tokenizer, template, init_from, ends or None)


def init_source_config(init_from: str) -> ModelConfig:
    """The model config of what `model.init_from` names, read without its weights."""
    path = Path(init_from).expanduser()
    if (path / "config.yaml").is_file():
        return read_run_config(path / "config.yaml").model.resolved()
    return pretrained_config(init_from, "model.init_from={folder}")


def init_config(base: ModelConfig, wanted: ModelConfig) -> ModelConfig:
    """The config of a model started from `base`: its shape, with the context, dropout and vocabulary asked for."""
    if wanted.block_size > base.block_size and base.position == "learned":
        raise GptlabError(
            f"model.block_size={wanted.block_size} is longer than the {base.block_size} positions "
            f"{wanted.init_from} learned",
            f"set model.block_size to at most {base.block_size}",
        )
    local = Path(wanted.init_from).expanduser()
    # a folder is kept as an absolute path, so a LoRA run finds its base from anywhere
    init_from = str(local.resolve()) if local.is_dir() else wanted.init_from
    return replace(
        base, init_from=init_from, block_size=wanted.block_size, dropout=wanted.dropout,
        vocab_size=max(base.vocab_size, wanted.vocab_size),
    ).resolved()  # fmt: skip


def init_tensors(base: GPT, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`base`'s weights shaped for `cfg`: the position table cut to the context, embeddings grown for new tokens.

    New tokens' rows start at the mean of the trained rows (as `transformers`' resize_token_embeddings), so
    they begin as an average token rather than noise that would swamp the first steps.
    """
    tensors = model_tensors(base)
    if "pos_emb.weight" in tensors:
        tensors["pos_emb.weight"] = tensors["pos_emb.weight"][: cfg.block_size]
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in tensors and len(tensors[name]) < cfg.vocab_size:
            w = tensors[name]
            tensors[name] = torch.cat([w, w.mean(0, keepdim=True).expand(cfg.vocab_size - len(w), -1)])
    for name in [n for n in tensors if n.endswith(".value_embed.weight")]:  # model.value_embeds: new rows as at init
        w = tensors[name]
        tensors[name] = torch.cat([w, w.new_zeros(cfg.vocab_size - len(w), w.shape[1])])
    return {k: v.contiguous() for k, v in tensors.items()}


def base_fingerprint(model: GPT) -> str:
    """A cheap fingerprint of a base model's weights (shapes and a sample of values), to notice a changed base."""
    h = hashlib.sha256()
    for name, t in sorted(model_tensors(model).items()):
        flat = t.flatten().float()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(torch.cat([flat[:256], flat[-256:]]).numpy().tobytes())
    return h.hexdigest()


def build_model(cfg: Config, base: Pretrained | None = None) -> GPT:
    """The model a run trains: random, or started from `base` (shaped by `init_tensors`), with LoRA adapters if set."""
    model = GPT(cfg.model)
    if base is not None:
        load_model_tensors(model, init_tensors(base.model, model.cfg), base.origin)
    if cfg.train.lora_rank:
        add_lora(model, cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_dropout)
    return model


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> tuple[Any, GPT, Any]:
    """(config, model in eval mode, tokenizer) of a run directory's checkpoint ('best' falls back to 'latest').

    A LoRA run's adapters are merged into its base, so the model is a plain one.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise GptlabError(
            f"'{run_dir}' is not a run directory (config.yaml missing)", "pass the train.out_dir of a run"
        )
    cfg = read_run_config(config_path)
    if which == "best" and read_pointer(run_dir / "checkpoints" / "best") is None:
        which = "latest"
    path = find_checkpoint(run_dir, which)
    meta = read_meta(path)
    base = load_init(cfg.model.init_from) if cfg.train.lora_rank else None
    if base is not None and meta.get("base_fingerprint") != base_fingerprint(base.model):
        raise GptlabError(
            f"the base model '{cfg.model.init_from}' of the LoRA run '{run_dir}' is not the one its adapters were "
            "trained on",
            "point model.init_from in its config.yaml at the original base",
        )
    model = build_model(cfg, base)
    load_model_tensors(model, load_weights(path), str(path))
    merge_lora(model)
    return cfg, model.to(device).eval(), Tokenizer.load(run_dir / "tokenizer.json")
