"""Chat templates: the Jinja templates of Hugging Face tokenizers, rendered the way `transformers` renders them.

A template lives beside its tokenizer.json, as `chat_template.jinja` or in `tokenizer_config.json`; the server
renders chat requests with it and supervised fine-tuning renders its prompts with it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"  # transformers' file: the template's special-token names (bos_token, ...)


class ChatTemplate:
    """A Jinja chat template rendered as `transformers` renders it (sandboxed, trim_blocks, lstrip_blocks)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise GptlabError(f"the chat template does not parse: {e}", "fix chat_template.jinja") from e
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def save(self, folder: str | Path) -> None:
        """Write `chat_template.jinja` and the special-token names it uses (tokenizer_config.json) into `folder`."""
        folder = Path(folder)
        for name, text in ((TEMPLATE_FILE, self.source), (CONFIG_FILE, json.dumps(self.special_tokens, indent=2))):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(folder / name)

    def fingerprint(self) -> str:
        """sha256 of the template and its special-token names: what decides the text it renders."""
        return hashlib.sha256(json.dumps([self.source, self.special_tokens], sort_keys=True).encode()).hexdigest()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The text of a conversation; with `add_generation_prompt`, ending where the assistant's reply begins."""
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def load_chat_template(run_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json (`chat_template.jinja`, else tokenizer_config.json's), if any."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except ValueError as e:
        raise GptlabError(f"'{config_path}' is not valid JSON ({e})", "fix or remove the file") from e
    source = config.get("chat_template")
    if isinstance(source, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    jinja_path = run_dir / TEMPLATE_FILE
    if jinja_path.is_file():
        source = jinja_path.read_text(encoding="utf-8")
    if not source:
        return None
    specials = {}
    eos = next((t for t, i in tokenizer.special_ids.items() if i == tokenizer.eos_id), None)
    if eos is not None:
        specials["eos_token"] = eos
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    return ChatTemplate(source, specials)
