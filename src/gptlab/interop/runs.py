"""Run directories in and out: `export` writes a run as a `transformers` folder (which vLLM and TGI serve too),
`import_hf` makes a run directory of a Hugging Face model that `gptlab sample`, `serve`, `export` and fine-tuning read.
Both build their folder under a temporary name and rename it into place, so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptlab.chat import ChatTemplate, end_token_ids, load_chat_template
from gptlab.config import Config, to_yaml
from gptlab.data.shards import write_atomic
from gptlab.errors import GptlabError, is_write_failure, write_error
from gptlab.interop import hf
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer
from gptlab.train.checkpoint import load_run, model_tensors, save_checkpoint


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    """Write a run's model, tokenizer and generation settings as a `from_pretrained` folder."""
    transformers = hf.require_transformers()
    cfg, model, tokenizer = load_run(run_dir, checkpoint, "cpu")
    template = load_chat_template(run_dir, tokenizer)
    ends = end_token_ids(tokenizer, template, cfg.sample.end_tokens)
    out = check_new_folder(out_dir)
    hf_model = hf.to_hf(model)
    eos = ends[0] if ends else None  # the end of text; generate stops at any of `ends` (an end of turn too)
    hf_model.config.eos_token_id = hf_model.config.pad_token_id = eos
    # only what generate needs: a max_length would make `generate(max_new_tokens=...)` warn that both are set
    hf_model.generation_config = transformers.GenerationConfig(
        eos_token_id=ends if len(ends) > 1 else eos, pad_token_id=eos
    )
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar would sit above an error line
    try:
        with building(out) as tmp:  # a folder that is whole, or not there
            hf_model.save_pretrained(tmp)  # config.json, model.safetensors, generation_config.json
            hf.hf_tokenizer(tokenizer, template, eos).save_pretrained(tmp)
            readable_by_transformers4(tmp)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return out


def readable_by_transformers4(folder: Path) -> None:
    """Add what transformers 4.x reads to a folder transformers 5 wrote: the flat `rope_theta` (4.x ignores the
    nested `rope_parameters` and would silently take 10000) and a tokenizer class 4.x has, giving the inputs
    4.x's models take (5.x reads both alike)."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":  # gptlab writes none; kept in 4.x's place if ever
            config["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # 4.x's fast tokenizers return token_type_ids by default, which generate(**tokenizer(text)) refuses
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def check_new_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, or a user error if it is a file or a folder that holds anything (nothing is replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"'{out}' is a file", "give a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        raise GptlabError(f"'{out}' is not empty", "give a new or empty folder")
    return out


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A sibling temporary folder to fill, renamed onto `out` at the end (whatever `out` held goes: check first)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a file where a parent folder should be
        raise GptlabError(
            f"cannot make the folder '{out.parent}' ({e.strerror})", "give a path whose parents are folders"
        ) from e
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.is_dir():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # safetensors reports a full disk as a SafetensorError, transformers as an OSError
        if is_write_failure(e):
            raise write_error(e, out) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_hf(source: str, out_dir: str | Path, overwrite: bool = False) -> Path:
    """A run directory (config, tokenizer, chat template, one checkpoint) from a Hugging Face GPT-2 or Llama model."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"'{out}' is a file", "give a folder for the run directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GptlabError(f"'{out}' is not empty", "give a new folder, or pass --overwrite")
        if not (out / "config.yaml").is_file():  # --overwrite replaces runs, not any folder
            raise GptlabError(f"'{out}' holds files but is not a run directory", "give a new or empty folder")
    model, tokenizer, template, ends = hf.load_pretrained(source, "gptlab import hf {folder} " + shlex.quote(str(out)))
    cfg = Config(model=model.cfg)
    cfg.sample.end_tokens = ends or None  # the model's own: an instruct model ends its turn with <|im_end|>, say
    with building(out) as tmp:  # an old run (--overwrite) goes only once the new one is whole
        write_run(tmp, model, tokenizer, out, cfg=cfg, template=template, meta={"imported_from": source})
    return out


def write_run(
    folder: Path,
    model: GPT,
    tokenizer: Tokenizer,
    out_dir: str | Path | None = None,
    *,
    cfg: Config | None = None,
    template: ChatTemplate | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Fill `folder` as a run directory holding `model` as its only checkpoint (step 0): config.yaml (`cfg`, default
    the model's config; its train.out_dir `out_dir`, default `folder`), tokenizer.json and the chat template."""
    cfg = cfg if cfg is not None else Config(model=model.cfg)
    cfg.data.tokenizer = "tokenizer.json"
    cfg.data.special_tokens = sorted(tokenizer.special_ids, key=tokenizer.special_ids.get)
    cfg.train.out_dir = str(out_dir if out_dir is not None else folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.yaml", to_yaml(cfg).encode())
    tokenizer.save(folder / "tokenizer.json")
    if template is not None:
        template.save(folder)
    save_checkpoint(folder / "checkpoints", 0, model_tensors(model), {}, meta or {})
    return folder
