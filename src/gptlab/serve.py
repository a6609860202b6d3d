"""The HTTP server: an OpenAI-compatible API and a small web page over one continuous-batching `Engine`.

The engine is not thread-safe, so one background thread owns it: it takes submissions and cancellations from a
queue, runs `Engine.step()` while there is work and sleeps when there is none. Each request's updates go back to
the asyncio task serving it through `loop.call_soon_threadsafe`, so concurrent requests share forward passes,
joining and leaving the running batch between steps.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.chat import ChatTemplate, end_token_ids, load_chat_template
from gptlab.config import sampling_problem
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams, TokenLogprob, Update, seeded
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

MAX_TOKENS_CAP = 4096  # the largest max_tokens a request may ask for
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # stop strings per request, and their length
MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_CHOICES = 1024  # prompts times n in one request: each is a request of the engine
MAX_LOGPROBS = 20  # the most alternatives per token `logprobs` may ask for (vLLM's default limit; OpenAI's is 5)
CHAT_MAX_TOKENS = 256  # chat's default max_tokens (OpenAI's is "until the end", which a small model may never reach)
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
CLIENT_CLOSED = 499  # the status logged for a request whose client left before the answer (nobody receives it)

log = logging.getLogger(__name__)


# ----- errors ---------------------------------------------------------------------------------------------------
class APIError(Exception):
    """A request the server refuses, answered as OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        """The JSON response OpenAI's clients parse."""
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _validation_error(exc: RequestValidationError, unions: bool = True) -> APIError:
    """FastAPI's 422 for a body that does not parse or fit the schema, as one clear 400 (`unions`: the body is an
    OpenAI one, whose fields in UNION_FIELDS take several types)."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json)")
    param = ".".join(loc)
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param)
    if unions and loc[0] in UNION_FIELDS:  # one error per alternative type: say what is accepted instead
        return APIError(400, UNION_FIELDS[loc[0]], loc[0])
    if err.get("type") in STRICT_TYPES:  # a value of the wrong JSON type: true for a number, "1" for a number...
        shown = json.dumps(err.get("input"), ensure_ascii=False)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return APIError(400, f"'{param}' must be {STRICT_TYPES[err['type']]}, got {shown}", param)
    return APIError(400, f"'{param}': {err['msg']}", param)


# the strict fields' types, as their errors name them: no value is converted (OpenAI refuses "1" for a number too)
STRICT_TYPES = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "dict_type": "an object", "list_type": "a list",
}  # fmt: skip

UNION_FIELDS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
    "messages": 'messages must be a list of {"role": ..., "content": ...} objects with text content',
}


# ----- request bodies -------------------------------------------------------------------------------------------
# OpenAI fields this server cannot honour: refused unless they hold their neutral value
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None,), "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "response_format": (None, {"type": "text"}),
}  # fmt: skip


class StreamOptions(BaseModel):
    """OpenAI's stream_options."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None  # a last event with the request's token counts


class _Body(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; unknown fields are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="allow")

    # null means "the default" for every field, as some clients send it. Types are strict: a value is never
    # converted, so `"max_tokens": true` or `"stream": "yes"` is a 400 naming the field (a number field takes ints)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None  # 1.0
    top_p: StrictFloat | None = None
    n: StrictInt | None = None  # 1: the choices of each prompt
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    # gptlab's own fields
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None  # 1.0
    truncate: Literal["left"] | None = None  # "left": drop a long prompt's oldest tokens instead of refusing it
    ignore_eos: StrictBool | None = None  # true: generate past the end-of-text token (benchmarks want exact lengths)
    # true: special tokens' text in the prompt (or messages) gets their ids; by default it is plain text, so a
    # user cannot end a document or fake a chat turn by typing <|endoftext|>
    allow_special: StrictBool | None = None


class CompletionBody(_Body):
    """The body of POST /v1/completions: OpenAI's four forms of prompt (text, texts, token ids, lists of ids)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None  # report each token's log-probability and its N likeliest alternatives
    echo: StrictBool | None = None  # the prompt's text first (and its tokens' logprobs, with logprobs)


class TokenizeBody(BaseModel):
    """The body of POST /tokenize (vLLM's)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool | None = None  # gptlab's tokenizers add none
    # special tokens' text gets their ids, as vLLM's /tokenize and Hugging Face tokenizers do (lm-eval finds the
    # end-of-text id so); false: plain text, as /v1/completions encodes a text prompt
    allow_special: StrictBool | None = None


class DetokenizeBody(BaseModel):
    """The body of POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    tokens: list[StrictInt]


class ChatMessage(BaseModel):
    """One chat message; content may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens


def _sampling(body: _Body) -> SamplingParams:
    """The body's sampling values, checked."""
    for name, neutral in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server (leave it out)", name)
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
    t = 1.0 if body.temperature is None else body.temperature
    r = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    params = SamplingParams(t, body.top_k, body.top_p, body.min_p, r, body.seed)
    problem = sampling_problem(t, body.top_k, body.top_p, body.min_p, r, body.seed)
    if problem is not None:
        key, what, fix = problem
        raise APIError(400, f"{key} {what} ({fix})", key)
    return params


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """The body's stop strings as a tuple, none of them empty."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):  # each is checked at every token
        raise APIError(400, f"give at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the template, text parts joined into one string."""
    if not messages:
        raise APIError(400, "messages must not be empty (send at least one message)", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content})
    return out


# ----- the engine thread ----------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One request as the engine thread sees it, and the asyncio queue its updates go to."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stop_at_eos: bool
    loop: asyncio.AbstractEventLoop
    inbox: asyncio.Queue
    handle: int | None = None

    def put(self, item: object) -> None:
        """Hand an item to the request's task (called from the engine thread)."""
        _deliver(self.loop, [(self, item)])


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[_Job, object]]) -> None:
    """Hand items to their requests' queues with one wake-up of their event loop (from the engine thread)."""

    def put_all() -> None:
        for job, item in items:
            job.inbox.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop has closed: nobody is listening any more
        pass


class EngineThread:
    """Owns an `Engine` from one background thread; asyncio code submits and cancels requests through it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.running = self.waiting = 0  # published by the engine thread after each step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self._submitted = 0  # submissions not yet taken by the engine thread
        self.dead: BaseException | None = None  # why the engine thread stopped, if it did
        self._thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot, including those the engine thread has not taken yet."""
        with self._lock:
            return self.waiting + self._submitted

    async def start(self, job: _Job) -> None:
        """Submit a job; raises APIError if the engine refuses it."""
        if self.dead is not None:
            raise APIError(503, f"the generation engine stopped: {self.dead!r} (restart the server)")
        with self._lock:
            self._submitted += 1
        self._commands.put(("submit", job))
        try:
            accepted = await job.inbox.get()  # the engine thread answers with the handle or the engine's ValueError
        except asyncio.CancelledError:
            self.cancel(job)
            raise
        if isinstance(accepted, ValueError):  # a request the engine cannot honour
            raise APIError(400, str(accepted))
        if isinstance(accepted, BaseException):
            raise APIError(500, f"the request could not start: {accepted!r}")

    def cancel(self, job: _Job) -> None:
        """Drop a job from the engine, freeing its slot (a no-op once it finished)."""
        self._commands.put(("cancel", job))

    async def updates(self, job: _Job) -> AsyncIterator[Update]:
        """A started job's updates until it finishes; it is cancelled if the consumer stops early.

        Updates that queued up while the consumer was busy come out merged into one: under load a stream
        sends fewer, longer events (the same text) rather than falling behind one token at a time.
        """
        finished = False
        try:
            while not finished:
                item = await job.inbox.get()
                while isinstance(item, Update) and not item.finished and not job.inbox.empty():
                    later = job.inbox.get_nowait()
                    if isinstance(later, BaseException):  # the text so far goes out before the error
                        yield item
                        item = later
                        break
                    item = _merged(item, later)
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item!r}")
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.cancel(job)

    def close(self) -> None:
        """Stop the engine thread after the step it is in."""
        self._commands.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside a step: answer everyone rather than leave them waiting
            log.exception("the engine thread stopped; the server answers 503 from now on")
            self.dead = e
            for job in list(self._jobs.values()):
                job.put(e)
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command is not None:
                    command[1].put(e)

    def _loop(self) -> None:
        while True:
            # block while idle; otherwise take whatever arrived during the last step and go on stepping
            commands = [] if self.engine.has_work() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is None:
                    return
                kind, job = command
                self._submit(job) if kind == "submit" else self._cancel(job)
            if self.engine.has_work():
                self._step()
            self._publish()

    def _publish(self) -> None:
        with self._lock:
            self.running, self.waiting = self.engine.num_running, self.engine.num_waiting

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._submitted -= 1
        try:
            job.handle = self.engine.submit(job.prompt_ids, job.max_new_tokens, job.params, job.stop, job.stop_at_eos)
        except Exception as e:  # answered to the request; the engine thread keeps serving the others
            job.put(e)
            return
        self._jobs[job.handle] = job
        job.put(job.handle)

    def _cancel(self, job: _Job) -> None:
        if job.handle is not None and self._jobs.pop(job.handle, None) is not None:
            self.engine.cancel(job.handle)

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as e:  # e.g. out of memory: fail the running requests, keep serving
            log.exception("a generation step failed; its requests are answered with an error")
            for handle, job in list(self._jobs.items()):
                self.engine.cancel(handle)
                job.put(e)
            self._jobs.clear()
            return
        self._publish()  # before the updates go out: a client that saw its text sees itself counted
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Job, object]]] = {}
        for update in updates:
            job = self._jobs.get(update.id)
            if job is None:  # cancelled while this step ran
                continue
            if update.finished:
                del self._jobs[update.id]
            deliveries.setdefault(job.loop, []).append((job, update))
        for loop, items in deliveries.items():  # one wake-up of each event loop a step, not one per request
            _deliver(loop, items)


# ----- the choices of a response --------------------------------------------------------------------------------
def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion body's prompt as a list of prompts, each a text or token ids (OpenAI's four forms)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list (give a prompt, or a list of prompts)", "prompt")
    if isinstance(prompt[0], int):  # one prompt of token ids
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _merged(a: Update, b: Update) -> Update:
    """Two consecutive updates of one request as one."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    first = a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs
    return replace(
        b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=logprobs, prompt_logprobs=first
    )


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (a token the model rules out) as -9999, as OpenAI and vLLM send it."""
    return max(logprob, -9999.0)


class _TokenTexts:
    """OpenAI's `logprobs` object of one choice, built as its tokens arrive: each token's text, where it starts in
    the choice's text (the echoed prompt's tokens come first), its log-probability and the likeliest tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.table = tokenizer.token_bytes()  # byte-level and character tokenizers: decoding joins these bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self.table is not None else None
        self.ids: list[int] = []  # the tokens so far, for other tokenizers (decoded again for each offset)
        self.chars = 0  # characters the tokens so far decode to

    def text(self, token: int) -> str:
        """A token's text; one that holds part of a UTF-8 character shows its bytes, as OpenAI's do ("bytes:\\xe2")."""
        if self.table is None:
            return self.tokenizer.decode([token])
        data = self.table[token] if token < len(self.table) else b""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _offset(self, token: int) -> int:
        """Where `token` starts in the text (a piece of a character: where that character starts); then add it."""
        at = self.chars
        if self.utf8 is not None:
            assert self.table is not None
            self.chars += len(self.utf8.decode(self.table[token] if token < len(self.table) else b""))
        else:
            self.ids.append(token)
            self.chars = len(self.tokenizer.decode(self.ids))
        return at

    def logprobs(self, pairs: list[tuple[int, TokenLogprob | None]]) -> dict[str, list]:
        """The object's lists for these (token, its logprobs) pairs; None logprobs: the prompt's first token."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in pairs:
            out["text_offset"].append(self._offset(token))
            out["tokens"].append(self.text(token))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(entry.logprob))
            top = {self.text(t): _finite(lp) for t, lp in entry.top}
            top.setdefault(self.text(entry.token), _finite(entry.logprob))  # the chosen token is always listed
            out["top_logprobs"].append(top)
        return out


class _Choice:
    """One choice of a response as its job's updates arrive: its pieces as stream chunks, or the whole of it."""

    def __init__(
        self, index: int, job: _Job, first_of_prompt: bool, echo: str = "", texts: _TokenTexts | None = None,
        chat: bool = False,
    ) -> None:  # fmt: skip
        self.index, self.job, self.chat = index, job, chat
        self.first_of_prompt = first_of_prompt  # the prompt's tokens count once in usage, not once per choice
        self.echo = echo  # put before the first piece: the prompt's text, with echo
        self.texts = texts  # with logprobs
        self.started = False
        self.text, self.reason, self.tokens = "", None, 0
        self.logprobs: dict[str, list] | None = None if texts is None else texts.logprobs([])

    def _piece(self, u: Update) -> tuple[str, dict[str, list] | None]:
        """The text and logprobs an update adds."""
        text = u.text
        if not self.started:
            self.started, text = True, self.echo + text
        self.tokens += len(u.token_ids)
        if self.texts is None:
            return text, None
        pairs = list(zip(self.job.prompt_ids, u.prompt_logprobs)) if u.prompt_logprobs is not None else []
        return text, self.texts.logprobs(pairs + [(e.token, e) for e in u.logprobs or ()])

    def add(self, u: Update) -> None:
        """Take in an update, for `whole`."""
        text, logprobs = self._piece(u)
        self.text += text
        self.reason = u.finish_reason
        if logprobs is not None and self.logprobs is not None:
            for key, values in logprobs.items():
                self.logprobs[key] += values

    def whole(self) -> dict[str, Any]:
        """The choice as a whole answer's JSON."""
        if self.chat:
            message = {"role": "assistant", "content": self.text}
            return {"index": self.index, "message": message, "logprobs": None, "finish_reason": self.reason}
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs, "finish_reason": self.reason}

    def chunk(self, u: Update) -> dict[str, Any] | None:
        """An update as a stream chunk's choice; None when it adds nothing."""
        text, logprobs = self._piece(u)
        if not (text or u.finished or (logprobs and logprobs["tokens"])):
            return None
        if self.chat:
            return {"index": self.index, "delta": {"content": text} if text else {}, "finish_reason": u.finish_reason}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": u.finish_reason}


# ----- the app --------------------------------------------------------------------------------------------------
def _sse(data: object) -> str:
    """One server-sent event in OpenAI's format."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    model_or_engine: GPT | Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    chat_template: ChatTemplate | str | None = None,
    max_batch: int = 32,
    max_tokens_cap: int = MAX_TOKENS_CAP,
    checkpoint: dict[str, Any] | None = None,
    end_ids: Sequence[int] | None = None,
    compile: bool = False,
) -> FastAPI:
    """The FastAPI app serving one model: /v1/completions, /v1/chat/completions, /v1/models, /health and /.

    `checkpoint` (what `served_checkpoint` gives) is added to the model's card in /v1/models. `end_ids` end a
    reply (default: the tokenizer's end of text and the chat template's end of turn; a run's, `chat.end_token_ids`).
    `compile`: decode through torch.compile, compiled here for one row and for several (see `warm_up`).

    On CPU, call it (and load the model) from a thread that exits before serving starts, as `serve` does:
    the engine thread's matmuls run several times slower while another live thread owns an OpenMP pool.
    """
    if isinstance(chat_template, str):
        chat_template = ChatTemplate(chat_template)
    ends = list(end_ids) if end_ids is not None else end_token_ids(tokenizer, chat_template)
    if isinstance(model_or_engine, Engine):
        engine = model_or_engine
    else:
        engine = Engine(model_or_engine, tokenizer, max_batch, eos_id=ends, compile=compile)
        if compile:
            warm_up(engine)
    worker = EngineThread(engine)
    created = int(time.time())
    page = resources.files("gptlab").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="gptlab", lifespan=lifespan)
    app.state.engine, app.state.worker = engine, worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc, unions=request.url.path.startswith("/v1/")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    vocab = min(engine.model.cfg.vocab_size, tokenizer.vocab_size)  # ids a token-id prompt may hold

    def check_model(name: str | None) -> None:
        """A request naming another model is a 404."""
        if name is not None and name != model_name:
            raise APIError(
                404, f"the model '{name}' does not exist (this server serves '{model_name}')", "model",
                "model_not_found",
            )  # fmt: skip

    def check_ids(ids: list[int], what: str, param: str) -> None:
        """Token ids outside the vocabulary are a 400 naming the first."""
        if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
            raise APIError(400, f"{what} has the token id {bad}, outside the vocabulary (ids 0 to {vocab - 1})", param)

    def check_request(
        body: _Body, default_max_tokens: int, least: int = 1
    ) -> tuple[int, SamplingParams, tuple[str, ...]]:
        """The body's max_tokens (at least `least`), sampling settings and stop strings, checked with its model."""
        check_model(body.model)
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if not least <= max_tokens <= max_tokens_cap:
            raise APIError(
                400, f"max_tokens must be between {least} and {max_tokens_cap}, got {max_tokens}", "max_tokens"
            )
        return max_tokens, _sampling(body), _stop_strings(body.stop)

    def job_for(
        body: _Body, ids: list[int], what: str, param: str, max_tokens: int, params: SamplingParams,
        stop: tuple[str, ...],
    ) -> _Job:  # fmt: skip
        """A job for the engine of one prompt's token ids (`what`, from the field `param`): refused when empty, or
        longer than the context unless the body asks to cut it."""
        if not ids:
            raise APIError(400, f"{what} is empty (give some text to continue)", param)
        context = engine.block_size
        if len(ids) > context:
            if body.truncate != "left":
                raise APIError(
                    400,
                    f"{what} has {len(ids)} tokens, more than the model's context of {context} "
                    f'(shorten it, or send "truncate": "left" to keep its last {context} tokens)',
                    param,
                )
            ids = ids[-context:]
        loop = asyncio.get_running_loop()
        return _Job(ids, max_tokens, params, stop, not body.ignore_eos, loop, asyncio.Queue())

    def encoded(encode: Callable[..., list[int]], allow_special: bool, param: str) -> list[int]:
        """A text's token ids, `encode(allow_special=...)`; a text the tokenizer cannot encode is a 400."""
        try:
            return encode(allow_special=allow_special)
        except GptlabError as e:  # e.g. characters a char vocabulary lacks
            raise APIError(400, str(e), param) from e

    def choices_of(job: _Job, n: int) -> list[_Job]:
        """n jobs of one prompt; with a seed, choice i samples with seed + i (so they differ)."""
        return [replace(job, params=p, inbox=asyncio.Queue()) for p in seeded(job.params, n)]

    async def start(jobs: list[_Job]) -> None:
        """Submit jobs together, so that they join the same step; if one is refused, none is kept."""
        outcomes = await asyncio.gather(*(worker.start(job) for job in jobs), return_exceptions=True)
        failed = [e for e in outcomes if isinstance(e, BaseException)]
        if failed:
            for job in jobs:
                worker.cancel(job)
            raise failed[0]

    async def collect(request: Request, choices: list[_Choice]) -> bool:
        """Run the choices' jobs to their end; False (and all cancelled) if the client left first."""

        async def gather(choice: _Choice) -> None:
            async for u in worker.updates(choice.job):
                choice.add(u)

        tasks = [asyncio.ensure_future(gather(c)) for c in choices]
        try:
            pending: set[asyncio.Future] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
                )
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break
                if pending and await request.is_disconnected():
                    return False
            for t in tasks:
                if t.done() and not t.cancelled() and (error := t.exception()) is not None:
                    raise error
            return True
        finally:
            for t in tasks:  # when unfinished, the generator's cleanup cancels the job in the engine
                t.cancel()

    def usage(choices: list[_Choice]) -> dict[str, int]:
        """Token counts: each prompt once (as its n choices share it), every choice's completion."""
        prompt_tokens = sum(len(c.job.prompt_ids) for c in choices if c.first_of_prompt)
        completion_tokens = sum(c.tokens for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def event_stream(choices: list[_Choice], body: _Body, head: dict[str, Any], first: list[dict]) -> StreamingResponse:
        """Server-sent events of started choices: `first` chunks, then each choice's pieces as they come (the
        pieces that queued up meanwhile merged, one chunk per choice), usage if asked, then [DONE]."""

        async def events() -> AsyncIterator[str]:
            for chunk in first:
                yield _sse({**head, "choices": [chunk]})
            arrived: asyncio.Queue[tuple[int, Update | APIError | None]] = asyncio.Queue()

            async def pump(i: int, job: _Job) -> None:
                try:
                    async for u in worker.updates(job):
                        arrived.put_nowait((i, u))
                except APIError as e:
                    arrived.put_nowait((i, e))
                finally:
                    arrived.put_nowait((i, None))

            tasks = [asyncio.ensure_future(pump(i, c.job)) for i, c in enumerate(choices)]
            try:
                left = len(choices)
                while left:
                    items = [await arrived.get()]
                    while not arrived.empty():
                        items.append(arrived.get_nowait())
                    merged: dict[int, Update] = {}
                    error = None
                    for i, item in items:
                        if item is None:
                            left -= 1
                        elif isinstance(item, APIError):
                            error = error or item
                        else:
                            merged[i] = _merged(merged[i], item) if i in merged else item
                    for i, u in merged.items():
                        chunk = choices[i].chunk(u)
                        if chunk is not None:
                            yield _sse({**head, "choices": [chunk]})
                    if error is not None:  # the status line has gone out: the error travels as an event
                        yield _sse({"error": {"message": error.message, "type": error.kind, "param": None,
                                              "code": None}})  # fmt: skip
                        break
            finally:
                for t in tasks:
                    t.cancel()
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(choices)})
            yield _sse("[DONE]")

        def cancel_all() -> None:
            for c in choices:
                worker.cancel(c.job)

        # the background task also runs when a disconnect cuts the stream before it began: no slot is kept
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            events(), media_type="text/event-stream", headers=headers, background=BackgroundTask(cancel_all)
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        logprobs, echo = body.logprobs, bool(body.echo)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}", "logprobs")
        # echo with max_tokens 0 only scores the prompt (what lm-eval's local-completions asks)
        max_tokens, params, stop = check_request(body, 16, least=0 if echo else 1)
        # the prompt's logprobs come from a forward of their own: only asked for with echo
        params = replace(params, logprobs=logprobs, prompt_logprobs=logprobs if echo else None)
        prompts = _prompts(body.prompt)
        n = body.n or 1
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(
                400, f"{len(prompts)} prompts times n={n} make {len(prompts) * n} completions, more than "
                f"{MAX_CHOICES} (send fewer prompts per request)", "prompt",
            )  # fmt: skip
        choices: list[_Choice] = []
        for p, prompt in enumerate(prompts):
            what = "the prompt" if len(prompts) == 1 else f"prompt {p}"
            if isinstance(prompt, str):
                ids = encoded(partial(tokenizer.encode, prompt), bool(body.allow_special), "prompt")
            else:
                ids = prompt
                check_ids(ids, what, "prompt")
            job = job_for(body, ids, what, "prompt", max_tokens, params, stop)
            # the text put first is the prompt as sent, or as the model saw it when given as ids or cut
            shown = prompt if isinstance(prompt, str) and job.prompt_ids == ids else tokenizer.decode(job.prompt_ids)
            for i, choice_job in enumerate(choices_of(job, n)):
                texts = _TokenTexts(tokenizer) if logprobs is not None else None
                choices.append(_Choice(len(choices), choice_job, i == 0, shown if echo else "", texts))
        await start([c.job for c in choices])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if body.stream:
            return event_stream(choices, body, head, [])
        if not await collect(request, choices):
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse({**head, "choices": [c.whole() for c in choices], "usage": usage(choices)})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        if chat_template is None:
            raise APIError(
                400, f"the model '{model_name}' has no chat template (use /v1/completions with a plain prompt, or add "
                "a chat_template.jinja to the run directory)", "messages",
            )  # fmt: skip
        messages = _chat_messages(body.messages)
        max_tokens, params, stop = check_request(body, CHAT_MAX_TOKENS)

        def encode(allow_special: bool) -> list[int]:
            # the template's own special tokens stay special; those typed in messages are text unless allowed
            try:
                return chat_template.encode(messages, tokenizer, allow_special=allow_special)
            except jinja2.TemplateError as e:
                raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e

        ids = encoded(encode, bool(body.allow_special), "messages")
        job = job_for(body, ids, "the conversation", "messages", max_tokens, params, stop)
        choices = [_Choice(i, j, i == 0, chat=True) for i, j in enumerate(choices_of(job, body.n or 1))]
        await start([c.job for c in choices])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            roles = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for c in choices]  # fmt: skip
            return event_stream(choices, body, {**head, "object": "chat.completion.chunk"}, roles)
        if not await collect(request, choices):
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(
            {**head, "object": "chat.completion", "choices": [c.whole() for c in choices], "usage": usage(choices)}
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gptlab"}
        # extra fields say which weights answer (a fine-tune's best may be an early step); OpenAI clients ignore them
        return {"object": "list", "data": [{**card, "context_length": engine.block_size, **(checkpoint or {})}]}

    # vLLM's tokenizer endpoints: with them lm-eval's local-completions needs no tokenizer of its own (it finds
    # them at start, its tokenizer_backend "auto", and counts context tokens with the served model's tokenizer)
    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        check_model(body.model)
        allow = True if body.allow_special is None else body.allow_special
        ids = encoded(partial(tokenizer.encode, body.prompt), allow, "prompt")
        return {"count": len(ids), "max_model_len": engine.block_size, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
        check_model(body.model)
        check_ids(body.tokens, "tokens", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        eos = tokenizer.hf.id_to_token(ends[0]) if ends else None  # as the export names it: the first end token
        specials = chat_template.special_tokens if chat_template is not None else {}
        return {
            "tokenizer_class": f"gptlab {tokenizer.kind}", "eos_token": eos, "bos_token": specials.get("bos_token"),
            "pad_token": None, "chat_template": chat_template.source if chat_template is not None else None,
            "model_max_length": engine.block_size, "vocab_size": vocab,
        }  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if worker.dead is None else "error", "active": worker.running, "queued": worker.queued}
        return JSONResponse(body, status_code=200 if worker.dead is None else 503)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


# ----- running it -----------------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one), or a user error saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:  # create_server appends the address to strerror: say it once
        reason = os.strerror(e.errno) if e.errno and not isinstance(e, socket.gaierror) else e.strerror or str(e)
        raise GptlabError(
            f"cannot listen on {host}:{port}: {reason}", "pick another --port or --host, or stop what uses it"
        ) from e


def _outcome(fn: Callable[[], Any]) -> Any:
    """What fn returns, or the exception it raised."""
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for it
        return e


def served_checkpoint(run_dir: str | Path, which: str) -> tuple[str, dict[str, Any]]:
    """The pointer `which` resolves as `load_run` does ('best' falls back to 'latest') and the checkpoint it names:
    {"checkpoint": folder, "step": its step, "latest_step": the run's latest}, or {} when there is none."""
    from gptlab.train.checkpoint import find_checkpoint, read_meta, read_pointer

    if which == "best" and read_pointer(Path(run_dir) / "checkpoints" / "best") is None:
        which = "latest"
    try:
        path = find_checkpoint(run_dir, which)
        meta = read_meta(path)
    except GptlabError:  # load_run says what is wrong
        return which, {}
    try:
        latest = read_meta(find_checkpoint(run_dir, "latest")).get("step")
    except GptlabError:  # a damaged `latest` does not stop serving `best`
        latest = None
    card = {"checkpoint": path.name, "step": meta.get("step"), "latest_step": latest}
    if "imported_from" in meta:  # not trained here (gptlab import): its step 0 says nothing
        card["imported_from"] = meta["imported_from"]
    return which, card


def _describe(run_dir: str | Path, which: str, card: dict[str, Any]) -> str:
    """The start-up line naming the served checkpoint."""
    if "imported_from" in card:
        how = f"imported from {card['imported_from']}"
    elif card.get("latest_step") is not None:
        how = f"step {card.get('step')} of {card['latest_step']} trained"
    else:
        how = f"step {card.get('step')}"
    return f"checkpoint {card.get('checkpoint', which)} of {run_dir} ({which}, {how})"


def warm_up(engine: Engine) -> None:
    """Decode a few tokens for two rows at once, then for one, so that a compiled step is compiled for both
    shapes before the first request (each takes seconds), not while a client waits."""
    greedy = SamplingParams(temperature=0)
    if engine.max_batch > 1:
        for length in (2, 3):  # rows at different lengths: the general step
            engine.submit([0] * length, 3, greedy, stop_at_eos=False, truncate=True)
        while engine.has_work():
            engine.step()
    engine.submit([0, 0], 3, greedy, stop_at_eos=False)
    while engine.has_work():
        engine.step()


def run_app(
    run_dir: str | Path,
    name: str,
    checkpoint: str = "best",
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 32,
    compile: bool = False,
    quantize: str | None = None,
) -> tuple[FastAPI, str, dict[str, Any]]:
    """The app serving a run directory's checkpoint (its chat template and end tokens), the pointer it resolved
    and the checkpoint's card."""
    from gptlab.decode import check_compile
    from gptlab.quantize import check_quantize, quantize_int8
    from gptlab.train.checkpoint import load_run
    from gptlab.train.trainer import select_device, select_dtype

    # resolved once: the pointer a running training moves meanwhile cannot make the label and weights differ
    which, card = served_checkpoint(run_dir, checkpoint)
    torch_device = select_device(device)
    check_quantize(quantize, torch_device)
    if compile:
        check_compile(torch_device)
    cfg, model, tokenizer = load_run(run_dir, card.get("checkpoint", checkpoint), torch_device)
    model = model.to(select_dtype(dtype, torch_device))
    if quantize:
        model = quantize_int8(model)
    template = load_chat_template(run_dir, tokenizer)
    ends = end_token_ids(tokenizer, template, cfg.sample.end_tokens)
    app = create_app(model, tokenizer, name, chat_template=template, max_batch=max_batch, checkpoint=card,
                     end_ids=ends, compile=compile)  # fmt: skip
    return app, which, card


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 32,
    model_name: str | None = None,
    log_level: str = "info",
    compile: bool = False,
    quantize: str | None = None,
) -> None:
    """Load a run directory and serve it over HTTP until interrupted."""
    import uvicorn

    if max_batch < 1:
        raise GptlabError(f"--max-batch must be at least 1, got {max_batch}", "e.g. --max-batch 32")
    name = model_name or Path(run_dir).resolve().name

    served: list = []

    def build() -> FastAPI:
        app, which, card = run_app(run_dir, name, checkpoint, device, dtype, max_batch, compile, quantize)
        served.extend([which, card])
        return app

    sock = listen(host, port)  # before loading: a taken port fails fast
    try:
        # Torch's CPU thread pool (GNU OpenMP) stops spin-waiting once its live pools hold more threads than
        # there are cores, and every thread that runs a parallel op gets a pool of its own. Had this thread
        # loaded the model, the engine thread's matmuls would run ~6x slower (95 vs 16 us for a 384 x 1536
        # GEMV on 2 cores). So the loading (and the engine's set-up) runs in a thread that then exits, taking
        # its pool with it, and the engine thread holds the only one; this thread only serves HTTP.
        built: list = []
        loader = threading.Thread(target=lambda: built.append(_outcome(build)), name="gptlab-load", daemon=True)
        loader.start()
        loader.join()  # Ctrl-C interrupts the wait; the daemon thread does not hold the process
        if isinstance(built[0], BaseException):
            raise built[0]
        app = built[0]
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    print(f"serving '{name}' at {url} (web page at /, OpenAI API at /v1; Ctrl-C stops)", flush=True)
    print(_describe(run_dir, *served), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again: the normal way out
        pass
