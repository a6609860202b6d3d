"""The HTTP server: an OpenAI-compatible API and a small web page over one continuous-batching `Engine`.

The engine is not thread-safe, so one background thread owns it: it takes submissions and cancellations from a
queue, runs `Engine.step()` while there is work and sleeps when there is none. Each request's updates go back to
the asyncio task serving it through `loop.call_soon_threadsafe`, so concurrent requests share forward passes,
joining and leaving the running batch between steps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.chat import ChatTemplate, load_chat_template
from gptlab.config import sampling_problem
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams, Update
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

MAX_TOKENS_CAP = 4096  # the largest max_tokens a request may ask for
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # stop strings per request, and their length
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


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 for a body that does not parse or fit the schema, as one clear 400."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json)")
    param = ".".join(loc)
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param)
    if loc[0] in UNION_FIELDS:  # pydantic reports one error per alternative type: say what is accepted instead
        return APIError(400, UNION_FIELDS[loc[0]], loc[0])
    return APIError(400, f"'{param}': {err['msg']}", param)


UNION_FIELDS = {
    "prompt": "prompt must be a string, or a list of one string",
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


class _Body(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; unknown fields are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="allow")

    # null means "the default" for every field, as some clients send it
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # 1.0
    top_p: float | None = None
    n: int | None = None  # 1, the only value served
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    # gptlab's own fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # 1.0
    truncate: Literal["left"] | None = None  # "left": drop a long prompt's oldest tokens instead of refusing it
    ignore_eos: bool | None = None  # true: generate past the end-of-text token (benchmarks want exact lengths)
    # true: special tokens' text in the prompt (or messages) gets their ids; by default it is plain text, so a
    # user cannot end a document or fake a chat turn by typing <|endoftext|>; strict: a string "false" is a 400
    allow_special: StrictBool | None = None


class CompletionBody(_Body):
    """The body of POST /v1/completions."""

    prompt: str | list[str]


class ChatMessage(BaseModel):
    """One chat message; content may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


def _sampling(body: _Body) -> SamplingParams:
    """The body's sampling values, checked."""
    for name, neutral in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server (leave it out)", name)
    if body.n not in (None, 1):
        raise APIError(400, f"n must be 1, got {body.n} (send one request per completion)", "n")
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
                    item = replace(later, token_ids=item.token_ids + later.token_ids, text=item.text + later.text)
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
) -> FastAPI:
    """The FastAPI app serving one model: /v1/completions, /v1/chat/completions, /v1/models, /health and /.

    `checkpoint` (what `served_checkpoint` gives) is added to the model's card in /v1/models.

    On CPU, call it (and load the model) from a thread that exits before serving starts, as `serve` does:
    the engine thread's matmuls run several times slower while another live thread owns an OpenMP pool.
    """
    engine = model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine, tokenizer, max_batch)
    if isinstance(chat_template, str):
        chat_template = ChatTemplate(chat_template)
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
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    def job_for(
        body: _Body, encode: Callable[[bool], list[int]], what: str, param: str, default_max_tokens: int
    ) -> _Job:
        """Check a body and its prompt (`what`, from the field `param`, `encode(allow_special)` its token ids) and
        make them a job for the engine."""
        if body.model is not None and body.model != model_name:
            raise APIError(
                404, f"the model '{body.model}' does not exist (this server serves '{model_name}')", "model",
                "model_not_found",
            )  # fmt: skip
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= max_tokens_cap:
            raise APIError(400, f"max_tokens must be between 1 and {max_tokens_cap}, got {max_tokens}", "max_tokens")
        params, stop = _sampling(body), _stop_strings(body.stop)
        try:
            ids = encode(bool(body.allow_special))
        except GptlabError as e:  # e.g. characters a char vocabulary lacks
            raise APIError(400, str(e), param) from e
        if not ids:
            raise APIError(400, f"the {what} is empty (give some text to continue)", param)
        context = engine.block_size
        if len(ids) > context:
            if body.truncate != "left":
                raise APIError(
                    400,
                    f"the {what} has {len(ids)} tokens, more than the model's context of {context} "
                    f'(shorten it, or send "truncate": "left" to keep its last {context} tokens)',
                    param,
                )
            ids = ids[-context:]
        loop = asyncio.get_running_loop()
        return _Job(ids, max_tokens, params, stop, not body.ignore_eos, loop, asyncio.Queue())

    async def collect(request: Request, job: _Job) -> tuple[str, str | None, int] | None:
        """The whole text of a job, its finish reason and token count; None (and cancelled) if the client left."""

        async def gather() -> tuple[str, str | None, int]:
            texts, reason, n = [], None, 0
            async for u in worker.updates(job):
                texts.append(u.text)
                n += len(u.token_ids)
                reason = u.finish_reason
            return "".join(texts), reason, n

        task = asyncio.ensure_future(gather())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    return None
            return task.result()
        finally:
            task.cancel()  # when unfinished, the generator's cleanup cancels the job in the engine

    def usage(job: _Job, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = len(job.prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def event_stream(
        job: _Job, body: _Body, head: dict[str, Any], choice: Callable[[str, str | None], dict], first: list[dict]
    ) -> StreamingResponse:
        """Server-sent events of a started job: `first` chunks, one per update, usage if asked, then [DONE]."""

        async def events() -> AsyncIterator[str]:
            for chunk in first:
                yield _sse({**head, "choices": [chunk]})
            n = 0
            try:
                async for u in worker.updates(job):
                    n += len(u.token_ids)
                    if u.text or u.finished:
                        yield _sse({**head, "choices": [choice(u.text, u.finish_reason)]})
            except APIError as e:  # the status line has gone out: the error travels as an event
                yield _sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": None}})
            if (body.stream_options or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": usage(job, n)})
            yield _sse("[DONE]")

        # the background task also runs when a disconnect cuts the stream before it began: no slot is kept
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        cleanup = BackgroundTask(worker.cancel, job)
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers, background=cleanup)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(
                    400, f"prompt must be a string or a list of one string, got {len(prompt)} strings "
                    "(send one request per prompt)", "prompt",
                )  # fmt: skip
            prompt = prompt[0]
        job = job_for(body, lambda allow: tokenizer.encode(prompt, allow_special=allow), "prompt", "prompt", 16)
        await worker.start(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip

        def choice(text: str, reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if body.stream:
            return event_stream(job, body, head, choice, [])
        result = await collect(request, job)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        text, reason, n = result
        return JSONResponse({**head, "choices": [choice(text, reason)], "usage": usage(job, n)})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        if chat_template is None:
            raise APIError(
                400, f"the model '{model_name}' has no chat template (use /v1/completions with a plain prompt, or add "
                "a chat_template.jinja to the run directory)", "messages",
            )  # fmt: skip
        messages = _chat_messages(body.messages)

        def encode(allow_special: bool) -> list[int]:
            # the template's own special tokens stay special; those typed in messages are text unless allowed
            try:
                return chat_template.encode(messages, tokenizer, allow_special=allow_special)
            except jinja2.TemplateError as e:
                raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e

        job = job_for(body, encode, "conversation", "messages", CHAT_MAX_TOKENS)
        await worker.start(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:

            def delta(text: str, reason: str | None) -> dict[str, Any]:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}

            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            return event_stream(job, body, {**head, "object": "chat.completion.chunk"}, delta, [role])
        result = await collect(request, job)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        text, reason, n = result
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage(job, n)})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gptlab"}
        # extra fields say which weights answer (a fine-tune's best may be an early step); OpenAI clients ignore them
        return {"object": "list", "data": [{**card, "context_length": engine.block_size, **(checkpoint or {})}]}

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
) -> None:
    """Load a run directory and serve it over HTTP until interrupted."""
    import uvicorn

    from gptlab.train.checkpoint import load_run
    from gptlab.train.trainer import select_device, select_dtype

    if max_batch < 1:
        raise GptlabError(f"--max-batch must be at least 1, got {max_batch}", "e.g. --max-batch 32")
    name = model_name or Path(run_dir).resolve().name

    served: list = []

    def build() -> FastAPI:
        # resolved once: the pointer a running training moves meanwhile cannot make the label and weights differ
        which, card = served_checkpoint(run_dir, checkpoint)
        served.extend([which, card])
        torch_device = select_device(device)
        _, model, tokenizer = load_run(run_dir, card.get("checkpoint", checkpoint), torch_device)
        model = model.to(select_dtype(dtype, torch_device))
        template = load_chat_template(run_dir, tokenizer)
        return create_app(model, tokenizer, name, chat_template=template, max_batch=max_batch, checkpoint=card)

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
