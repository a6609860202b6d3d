"""Chat templates: the Jinja templates of Hugging Face tokenizers, rendered the way `transformers` renders them.

A template lives beside its tokenizer.json, as `chat_template.jinja` or in `tokenizer_config.json`; the server
renders chat requests with it and supervised fine-tuning renders its prompts with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"  # transformers' file: the template's special-token names (bos_token, ...)
# special tokens' text in messages is swapped for OPEN index CLOSE before rendering (private-use characters, which no
# template writes), so that after rendering it is told apart from the specials the template itself writes
OPEN, CLOSE = "\ue000", "\ue001"
MARK = re.compile(f"{OPEN}(\\d+){CLOSE}")


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

    def encode(
        self,
        messages: list[dict[str, Any]],
        tokenizer: Tokenizer,
        add_generation_prompt: bool = True,
        allow_special: bool = False,
    ) -> list[int]:
        """Token ids of a conversation: the template's special tokens are special, those typed in messages are text.

        With `allow_special`, special tokens' text in the messages gets their ids too (the rendered text encoded
        whole, as data preparation does). A template that cuts or reverses message text may cut a swapped-in mark;
        its characters are then text.
        """
        if allow_special:
            return tokenizer.encode(self.render(messages, add_generation_prompt), allow_special=True)
        # OPEN itself is swapped too, so a message holding the private-use characters still reads back exactly
        literals = [*sorted(tokenizer.special_ids, key=len, reverse=True), OPEN]
        index = {t: i for i, t in enumerate(literals)}
        found = re.compile("|".join(map(re.escape, literals)))

        def swap(value: Any) -> Any:
            if isinstance(value, str):
                return found.sub(lambda m: f"{OPEN}{index[m.group()]}{CLOSE}", value)
            if isinstance(value, list):
                return [swap(v) for v in value]
            if isinstance(value, dict):
                return {k: swap(v) for k, v in value.items()}
            return value

        rendered = self.render([swap(m) for m in messages], add_generation_prompt)
        ids: list[int] = []
        text: list[str] = []  # plain text since the last template special: encoded as one piece, as a whole text is
        for i, piece in enumerate(MARK.split(rendered)):
            if i % 2:  # a mark: the message's own text
                text.append(literals[int(piece)])
                continue
            for j, part in enumerate(tokenizer.split_specials(piece)):
                if j % 2:  # a special token the template wrote
                    ids += tokenizer.encode("".join(text), allow_special=False)
                    ids.append(tokenizer.special_ids[part])
                    text = []
                else:
                    text.append(part)
        return ids + tokenizer.encode("".join(text), allow_special=False)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def load_chat_template(run_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json (`chat_template.jinja`, else tokenizer_config.json's), if any."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise GptlabError(f"'{config_path}' is not valid JSON ({e})", "fix or remove the file") from e
    source = config.get("chat_template")
    if isinstance(source, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    jinja_path = run_dir / TEMPLATE_FILE
    if jinja_path.is_file():
        try:
            source = jinja_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GptlabError(
                f"'{jinja_path}' is not UTF-8 text ({e.reason} at byte {e.start})", "fix or remove the file"
            ) from e
    if not source:
        return None
    specials = {}
    if tokenizer.eos_token is not None:
        specials["eos_token"] = tokenizer.eos_token
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    return ChatTemplate(source, specials)


def end_of_turn(template: ChatTemplate, tokenizer: Tokenizer) -> str | None:
    """The token a template writes right after an assistant's message (ChatML's `<|im_end|>`), if it writes one."""
    mark = "\ue00f"  # a private-use character no template writes: where the assistant's message ends
    try:
        text = template.render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], add_generation_prompt=False
        )
    except (GptlabError, jinja2.TemplateError, TypeError, ValueError):  # a template that needs other messages
        return None
    after = text[text.find(mark) + 1 :].lstrip() if mark in text else ""
    found = [t for t in tokenizer.added_tokens if after.startswith(t)]
    return max(found, key=len) if found else None


def end_token_ids(
    tokenizer: Tokenizer, template: ChatTemplate | None = None, names: Sequence[str] | None = None
) -> list[int]:
    """The ids that end a generation: `names` (a run's `sample.end_tokens`; by default the tokenizer's end of text),
    then the template's end of turn, which ends replies whatever the names (a chat fine-tune of a base whose
    end tokens it inherits ends its turns with its own template's marker)."""
    names = list(names) if names is not None else [tokenizer.eos_token] if tokenizer.eos_token is not None else []
    eot = end_of_turn(template, tokenizer) if template is not None else None
    names += [eot] if eot is not None else []
    ids = []
    for name in names:
        i = tokenizer.hf.token_to_id(name)
        if i is None:
            raise GptlabError(
                f"end token '{name}' is not in the tokenizer's vocabulary", "fix sample.end_tokens in config.yaml"
            )
        ids += [i] if i not in ids else []
    return ids
