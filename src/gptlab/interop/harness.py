"""lm-evaluation-harness model `gptlab`: `lm_eval --model gptlab --model_args run=RUN_DIR --tasks ...`.

`GptlabLM` scores and generates with a run's own model and tokenizer, batched: log-likelihoods of many requests
per forward (sorted by length, right-padded, logits computed only where a continuation is scored), rolling
log-likelihoods over lm-eval's disjoint windows, and generation through gptlab's continuous-batching `Engine`.
Text is encoded as lm-eval's `--model hf` encodes it for the run's `gptlab export` folder (the same tokenizer,
end-of-text as the prefix of an empty context, left truncation to the context), so both give the same numbers.

lm-eval finds the model through the `lm_eval.models` entry point of gptlab's package metadata; `lm_eval_bridge`
registers that entry point in lm-eval releases that do not read the group themselves. This is the only module
that imports lm_eval.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gptlab import threads
from gptlab.chat import end_token_ids, load_chat_template
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams
from gptlab.interop.hf import SPECIAL_NAMES
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import DTYPES, autocast, select_device

DEFAULT_BATCH_SIZE = 16
MAX_GEN_TOKS = 256  # lm-eval's default for a request that names no max_gen_toks (HFLM's)
MODEL_ARGS = ("run", "checkpoint", "device", "batch_size", "max_length", "dtype", "max_batch_size")
ARGS_FIX = (
    "model_args are run=RUN_DIR[,checkpoint=best|latest|step_N,device=auto|cpu|cuda,batch_size=N,max_length=N,"
    "dtype=float32|bfloat16|float16]"
)
# generation settings a request may carry besides until, max_gen_toks and do_sample: gptlab's SamplingParams
GEN_KWARGS = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"}
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' mark of where a message to continue ends
# run the tokens before shared continuations once (KV cache) when that runs fewer than this share of the tokens
SHARE_BELOW = 0.75
Request = tuple[Any, list[int], list[int]]  # (request strings or None, context ids, continuation ids)


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab run as an lm-eval model: loglikelihood, loglikelihood_rolling and generate_until, batched."""

    def __init__(
        self,
        run: str | None = None,
        checkpoint: str = "best",
        device: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            name = next(iter(unknown))
            close = difflib.get_close_matches(name, MODEL_ARGS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise GptlabError(f"unknown model_args key '{name}' for lm_eval --model gptlab", hint + ARGS_FIX)
        if not run:
            raise GptlabError("lm_eval --model gptlab needs a run directory", "pass --model_args run=RUN_DIR")
        run = str(Path(run).expanduser())
        if not (Path(run) / "config.yaml").is_file():
            raise GptlabError(f"'{run}' is not a gptlab run directory (config.yaml missing)", ARGS_FIX)
        if dtype not in DTYPES:
            raise GptlabError(f"unknown dtype '{dtype}' in model_args", "use dtype=float32, bfloat16 or float16")
        try:
            self._device = select_device("auto" if device in (None, "") else str(device))
        except GptlabError as e:  # its fix names gptlab's train.device
            raise GptlabError(e.what, "use device=auto or device=cpu in --model_args") from e
        self._batch_size = _batch_size(batch_size, max_batch_size)
        cfg, model, tokenizer = load_run(run, str(checkpoint), self._device)
        self.run_dir, self.checkpoint, self.gpt, self.tok = str(run), str(checkpoint), model, tokenizer
        self.dtype = DTYPES[dtype]
        block = model.cfg.block_size
        if max_length is not None and not (isinstance(max_length, int) and 2 <= max_length <= block):
            raise GptlabError(f"max_length={max_length} is not a length from 2 to the run's context of {block}",
                              f"leave max_length out (the context, {block}) or give a smaller one")  # fmt: skip
        self._max_length = max_length or block
        self.template = load_chat_template(run, tokenizer)
        self.end_ids = end_token_ids(tokenizer, self.template, cfg.sample.end_tokens)
        # what `gptlab export` names eos and bos (the chat template's names win), which lm-eval's HF model uses
        names = {"eos_token": tokenizer.hf.id_to_token(self.end_ids[0])} if self.end_ids else {}
        if self.template is not None:
            names |= {k: v for k, v in self.template.special_tokens.items() if k in SPECIAL_NAMES}
        self._eot = tokenizer.hf.token_to_id(names["eos_token"]) if "eos_token" in names else None
        self._bos = tokenizer.hf.token_to_id(names["bos_token"]) if "bos_token" in names else None
        # a tokenizer.json whose post-processor adds tokens (BERT's [CLS] ... [SEP]) adds them as transformers does
        self._adds_specials = tokenizer.hf.num_special_tokens_to_add(False) > 0
        self.cpu_threads = threads.governor(adaptive=self._device.type == "cpu")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GptlabLM:
        """The model of `--model_args k=v,...`, the CLI's own settings filling in only what they leave out."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> GptlabLM:
        """The model of `arg_dict`; lm-eval's batch_size and device fill in only keys it lacks.

        The CLI always sends both (batch_size 1 and device cuda:0 unless told otherwise): a model_args key given
        as well must win rather than collide, batch size 1 is taken as the CLI's default, and a CUDA device on a
        machine without CUDA as its default too (lm-eval's HF model falls back the same way).
        """
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        device = extra.get("device")
        if "device" not in args and device is not None:
            if not (str(device).startswith("cuda") and not torch.cuda.is_available()):
                args["device"] = device
        if "batch_size" not in args and str(extra.get("batch_size", 1)) != "1":
            args["batch_size"] = extra["batch_size"]
        if "max_batch_size" not in args and "max_batch_size" in extra:
            args["max_batch_size"] = extra["max_batch_size"]
        return cls(**args)

    # ----- what lm-eval reads -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int | None:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: bos, else end-of-text (as lm-eval's HF model picks)."""
        prefix = self._bos if self._bos is not None else self._eot
        if prefix is None:
            raise GptlabError(
                f"the run '{self.run_dir}' has no end-of-text token to condition an empty context on",
                "give the task a context, or train with data.special_tokens holding <|endoftext|>",
            )
        return prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"gptlab:{self.run_dir}:{self.tok.fingerprint()[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's chat template source (lm-eval keys its cache on it)."""
        return self.template.source if self.template is not None and chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A conversation as lm-eval's HF model renders it with the exported template: without a generation prompt
        the last message is left open to be continued (transformers' continue_final_message), and a template that
        refuses a system message gets the conversation without it."""
        if self.template is None:
            raise GptlabError(f"the run '{self.run_dir}' has no chat template", "leave out --apply_chat_template")
        try:
            return self._render(chat_history, add_generation_prompt)
        except jinja2.TemplateError:
            return self._render([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text; the last message continued (cut where it ends) without a generation prompt."""
        messages = [dict(m) for m in chat_history]
        if not add_generation_prompt and messages:  # transformers marks the end of the message to continue
            messages[-1]["content"] = messages[-1]["content"] + CONTINUE_TAG
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not messages:
            return text
        at = text.rfind(CONTINUE_TAG.strip())
        if at < 0:
            raise GptlabError("the chat template drops the end of the last message", "use a template that keeps it")
        return text[:at] if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of `string` as lm-eval's HF model encodes them: special tokens' text gets their ids, and a
        post-processor's tokens are added unless `add_special_tokens` is False or the text starts with the prefix."""
        add = self._adds_specials and add_special_tokens is not False
        if add and add_special_tokens is None and string.startswith(self.tok.decode([self.prefix_token_id])):
            add = False
        try:
            ids = self.tok.hf.encode(string, add_special_tokens=True).ids if add else self.tok.encode(string)
        except GptlabError as e:  # a character vocabulary without some of the task's characters
            raise GptlabError(
                f"the task's text cannot be encoded with the run's tokenizer: {e.what}",
                "evaluate a run whose tokenizer covers the text (bpe, gpt2: every byte is a token)",
            ) from e
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; special tokens dropped by default, as lm-eval's HF model decodes generations."""
        return self.tok.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----- log-likelihoods ----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each continuation, `batch_size` requests at a time: longest
        contexts first, a context's continuations together (so a batch shares them), longest continuation first.

        Requests whose context + continuation[:-1] are equal (one-token answers to one question) share a row.
        """
        re_ord = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1]), tuple(r[1]), -len(r[2]), tuple(r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        out: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptlab loglikelihood")
        for chunk in re_ord.get_batched(n=self.batch_size):
            for (strings, ctx, cont), logp in zip(chunk, self._continuation_logprobs(chunk)):
                for strings_, cont_, logp_ in re_ord.get_cache(req_str=strings, cxt_toks=ctx, cont_toks=cont,
                                                               logits=logp[None]):  # fmt: skip
                    target = torch.tensor(cont_, device=logp_.device)
                    picked = logp_[0, -len(cont_) :]
                    answer = (
                        float(picked.gather(-1, target[:, None]).sum()),
                        bool((picked.argmax(-1) == target).all()),
                    )
                    out.append(answer)
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, answer)
                    bar.update(1)
        bar.close()
        return re_ord.get_original(out)

    def _continuation_logprobs(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        """Per request, log-softmax (len(continuation), vocab) at the positions predicting its continuation, each
        input cut on the left to the context. Requests that share the tokens before their continuation (the
        choices of one question) run them once when that saves work; the output head runs only where scored."""
        conts = [cont for _, _, cont in chunk]
        if not all(conts):
            raise GptlabError("a request has an empty continuation", "check the task's doc_to_choice/target")
        inps = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
        heads = [tuple(inp[: len(inp) - len(cont) + 1]) for inp, cont in zip(inps, conts)]  # up to the first scored
        unique = list(dict.fromkeys(heads))
        shared_cost = sum(map(len, unique)) + sum(len(c) - 1 for c in conts)
        with torch.inference_mode(), autocast(self._device, self.dtype):
            if shared_cost < SHARE_BELOW * sum(map(len, inps)):
                logits = self._shared_head_logits(unique, heads, [c[:-1] for c in conts], max(map(len, inps)))
            else:
                logits = self._logits_at(_padded(inps), [(len(i) - len(c), len(i)) for i, c in zip(inps, conts)])
            logp = logits.float().log_softmax(-1)
        return list(logp.split([len(c) for c in conts]))

    def _logits_at(
        self, x: torch.Tensor, spans: list[tuple[int, int]], slots: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        """(sum of span lengths, vocab) logits of row b's positions spans[b] in one forward of the rows `x`."""
        b_idx = torch.cat([torch.full((e - s,), b) for b, (s, e) in enumerate(spans)]).to(self._device)
        t_idx = torch.cat([torch.arange(s, e) for s, e in spans]).to(self._device)
        with self.cpu_threads.unit(tuple(x.shape)), _head_only_at(self.gpt, b_idx, t_idx):
            return self.gpt(x.to(self._device), positions=slots, cache=cache)

    def _shared_head_logits(
        self, unique: list[tuple[int, ...]], heads: list[tuple[int, ...]], tails: list[list[int]], width: int
    ) -> torch.Tensor:
        """Logits predicting each request's continuation: its head (the tokens up to the first scored one) among
        `unique` runs once into a KV cache, then each request's tail (the continuation but its last token) runs
        on a copy of its head's cache rows. Slot `width` of the cache takes the padding, which no token sees."""
        lens = torch.tensor([len(h) for h in unique], device=self._device)
        x = _padded(unique).to(self._device)
        cache = self.gpt.new_cache(len(unique), max_len=width + 1)
        offsets = torch.arange(x.shape[1], device=self._device)
        slots = torch.where(offsets < lens[:, None], offsets, width)
        with self.cpu_threads.unit(tuple(x.shape)):
            first = self.gpt(x, positions=slots, cache=cache, logits_at=lens - 1)[:, 0]  # (unique, vocab)
        cache.advance(lens)
        row = {h: u for u, h in enumerate(unique)}
        if not any(tails):  # one-token continuations: nothing more to run
            return first[torch.tensor([row[h] for h in heads], device=self._device)]
        cache.select([row[h] for h in heads])
        starts = cache.lengths.clone()
        y = _padded(tails)
        n = torch.tensor([len(t) for t in tails], device=self._device)
        offsets = torch.arange(y.shape[1], device=self._device)
        slots = torch.where(offsets < n[:, None], starts[:, None] + offsets, width)
        rest = self._logits_at(y, [(0, len(t)) for t in tails], slots, cache)
        order, at = [], len(unique)  # each request's rows of cat(first, rest): its head's, then its tail's
        for h, t in zip(heads, tails):
            order += [row[h], *range(at, at + len(t))]
            at += len(t)
        return torch.cat([first, rest])[torch.tensor(order, device=self._device)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: lm-eval's disjoint windows of the context length (the first conditioned
        on the prefix token), all windows of all texts batched together."""
        windows: list[Request] = []
        counts = []
        for (string,) in (r.args for r in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            mine = [(None, *lm_utils.make_disjoint_window(p)) for p in pairs]
            windows += mine
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for (string,), n in zip((r.args for r in requests), counts):
            total = sum(s for s, _ in scores[at : at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ----- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string, end-of-text or max_gen_toks, all requests on one continuous-batching
        engine (longest prompts first); greedy unless a request samples. Text is cut at the stop strings."""
        engine = Engine(self.gpt, self.tok, max_batch=self.batch_size, eos_id=self.end_ids)
        eos = self.tok_decode([self._eot], skip_special_tokens=False) if self._eot is not None else None
        jobs = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen, params = kwargs.pop("max_gen_toks"), _sampling(kwargs)
            room = self.max_length - max_gen
            if room < 1:
                raise GptlabError(
                    f"a request asks for {max_gen} new tokens, which leaves no room for a prompt in the run's "
                    f"context of {self.max_length}", "lower the task's max_gen_toks",
                )  # fmt: skip
            prompt = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
            jobs.append((i, prompt, max_gen, params, until))
        ids: dict[int, int] = {}
        for i, prompt, max_gen, params, until in sorted(jobs, key=lambda j: -len(j[1])):
            with _user_error("generation settings"):
                ids[engine.submit(prompt, max_gen, params, stop=[s for s in until if s])] = i
        tokens: list[list[int]] = [[] for _ in requests]
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptlab generate_until")
        with torch.inference_mode(), autocast(self._device, self.dtype):
            while engine.has_work():
                for u in engine.step():
                    tokens[ids[u.id]] += u.token_ids
                    bar.update(int(u.finished))
        bar.close()
        out = []
        for (context, gen_kwargs), (_, _, _, _, until), toks in zip((r.args for r in requests), jobs, tokens):
            text = postprocess_generated_text(self.tok_decode(toks), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def _padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token rows right-padded with 0 into one (len(rows), longest) tensor."""
    x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """A batch size from model_args or the CLI: a positive int, or auto (the default, capped by max_batch_size)."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return min(DEFAULT_BATCH_SIZE, max_batch_size) if max_batch_size else DEFAULT_BATCH_SIZE
    try:
        n = int(batch_size)
    except ValueError:
        n = 0
    if n < 1 or str(batch_size).strip() != str(n):
        raise GptlabError(f"batch_size={batch_size} is not a positive whole number", "e.g. batch_size=16")
    return n


def _sampling(kwargs: dict[str, Any]) -> SamplingParams:
    """gptlab's settings of a request's normalized generation kwargs: greedy without do_sample, else sampled at
    its temperature (1 when it names none, as transformers does)."""
    do_sample = bool(kwargs.pop("do_sample", False))
    unknown = sorted(set(kwargs) - GEN_KWARGS)
    if unknown:
        raise GptlabError(
            f"generation setting '{unknown[0]}' is not one gptlab's engine has",
            f"use only until, max_gen_toks, do_sample and {', '.join(sorted(GEN_KWARGS))}",
        )
    temperature = float(kwargs.get("temperature") or 0.0) if do_sample else 0.0
    if do_sample and temperature == 0.0:
        temperature = 1.0
    top_k = kwargs.get("top_k")
    params = SamplingParams(
        temperature=temperature,
        top_k=int(top_k) if top_k else None,
        top_p=kwargs.get("top_p"),
        min_p=kwargs.get("min_p"),
        repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
        seed=kwargs.get("seed"),
    )
    with _user_error("generation settings"):
        params.check()
    return params


@contextlib.contextmanager
def _user_error(what: str) -> Iterator[None]:
    """The engine's ValueErrors about a request as user errors."""
    try:
        yield
    except ValueError as e:
        raise GptlabError(f"a request's {what} are refused: {e}", "fix the task's generation_kwargs") from e


@contextlib.contextmanager
def _head_only_at(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """The model's output head run only at positions (rows[i], cols[i]): the forward returns (len(rows), vocab).

    The vocabulary projection of every position is most of a small model's work and memory when only a few
    continuation tokens per row are scored.
    """
    handle = model.lm_head.register_forward_pre_hook(lambda _, args: (args[0][rows, cols],))
    try:
        yield
    finally:
        handle.remove()
