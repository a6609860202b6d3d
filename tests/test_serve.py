"""The HTTP server: OpenAI-compatible errors and answers, the official client, real batching, the page in a browser."""

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from conftest import make_text, tiny_config
from fastapi.testclient import TestClient

import gptlab.serve
import gptlab.train.checkpoint
from gptlab.cli import main
from gptlab.data.shards import prepare
from gptlab.generate import Engine, SamplingParams, Update
from gptlab.serve import APIError, EngineThread, _Job, create_app, listen, load_chat_template
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

# speakers become roles: a char vocabulary only has the characters of the training text
TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages, please') }}{% endif %}"
    "{{ 'ROMEO' if m.role == 'user' else 'JULIET' }}:\n{{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}JULIET:\n{% endif %}"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run with a 64-token context (the conftest recipe, 10 steps)."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "corpus.txt").write_text(make_text())
    cfg = tiny_config(tmp, tmp / "corpus.txt", "model.block_size=64", "train.max_iters=10")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


@pytest.fixture(scope="module")
def client(run_dir: Path):
    """An in-process client of an app without a chat template."""
    _, model, tokenizer = load_run(run_dir, "latest")
    with TestClient(create_app(model, tokenizer, "run")) as c:
        yield c


class LiveServer:
    """uvicorn serving an app on a free port of 127.0.0.1 from a background thread."""

    def __init__(self, app) -> None:
        self.app = app
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(run_dir: Path):
    """A live server of the run, with a chat template."""
    _, model, tokenizer = load_run(run_dir, "latest")
    server = LiveServer(create_app(model, tokenizer, "run", chat_template=TEMPLATE))
    yield server
    server.stop()


def error(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


LONG = "the " * 20  # 80 characters, 80 tokens: more than the context of 64


@pytest.mark.parametrize(
    "body, status, message, param",
    [
        ({}, 400, "'prompt' is required", "prompt"),
        ({"prompt": ""}, 400, "the prompt is empty (give some text to continue)", "prompt"),
        ({"prompt": [1, "the"]}, 400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt"),
        ({"prompt": ["the", ""]}, 400, "prompt 1 is empty (give some text to continue)", "prompt"),
        ({"prompt": LONG}, 400, 'the prompt has 80 tokens, more than the model\'s context of 64 (shorten it, or send "truncate": "left" to keep its last 64 tokens)', "prompt"),
        ({"prompt": "the", "truncate": "right"}, 400, "'truncate': Input should be 'left'", "truncate"),
        ({"prompt": "caf\u00e9"}, 400, "text has characters outside the tokenizer's vocabulary: '\u00e9' (remove them from the prompt, or prepare data that contains them)", "prompt"),
        ({"prompt": "the", "max_tokens": 0}, 400, "max_tokens must be between 1 and 4096, got 0", "max_tokens"),
        ({"prompt": "the", "max_tokens": 4097}, 400, "max_tokens must be between 1 and 4096, got 4097", "max_tokens"),
        ({"prompt": "the", "max_tokens": 2.5}, 400, "'max_tokens' must be an integer, got 2.5", "max_tokens"),
        ({"prompt": "the", "temperature": -0.5}, 400, "temperature must be a finite number >= 0, got -0.5 (0 is greedy)", "temperature"),
        ({"prompt": "the", "temperature": "hot"}, 400, "'temperature' must be a number, got \"hot\"", "temperature"),
        ({"prompt": "the", "top_p": 0}, 400, "top_p must be in (0, 1], got 0.0 (e.g. 0.95, or leave it unset)", "top_p"),
        ({"prompt": "the", "top_p": 1.5}, 400, "top_p must be in (0, 1], got 1.5 (e.g. 0.95, or leave it unset)", "top_p"),
        ({"prompt": "the", "top_k": 0}, 400, "top_k must be at least 1, got 0 (or leave it unset)", "top_k"),
        ({"prompt": "the", "min_p": 1.5}, 400, "min_p must be in [0, 1], got 1.5 (e.g. 0.05, or leave it unset)", "min_p"),
        ({"prompt": "the", "repetition_penalty": 0}, 400, "repetition_penalty must be a finite number > 0, got 0.0 (1.0 is none)", "repetition_penalty"),
        ({"prompt": "the", "n": 129}, 400, "n must be between 1 and 128, got 129", "n"),
        ({"prompt": "the", "seed": 2**70}, 400, f"seed must be in [-2**63, 2**64), got {2**70} (e.g. 1337)", "seed"),
        ({"prompt": "the", "stop": ["x"] * 17}, 400, "give at most 16 stop strings of at most 1000 characters", "stop"),
        ({"prompt": "the", "stop": ["king", ""]}, 400, "stop strings must not be empty", "stop"),
        ({"prompt": "the", "stop": 3}, 400, "stop must be a string or a list of strings", "stop"),
        ({"prompt": "the", "logprobs": 21}, 400, "logprobs must be between 0 and 20, got 21", "logprobs"),
    ],
)  # fmt: skip
def test_bad_completion_requests_are_400s_in_openai_shape(client, body, status, message, param):
    r = client.post("/v1/completions", json=body)
    assert (r.status_code, r.json()) == (status, error(message, param))
    assert client.get("/health").json() == {"status": "ok", "active": 0, "queued": 0}  # nothing was queued


def test_unknown_model_malformed_json_no_chat_template_and_unknown_paths(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "the"})
    assert (r.status_code, r.json()) == (
        404,
        error("the model 'gpt-4' does not exist (this server serves 'run')", "model", "model_not_found"),
    )
    r = client.post("/v1/completions", content=b'{"prompt": "the",', headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (
        400,
        error("the request body is not valid JSON: Expecting property name enclosed in double quotes"),
    )
    for content, kind in [(b'["the"]', "application/json"), (b"the", "text/plain")]:
        r = client.post("/v1/completions", content=content, headers={"Content-Type": kind})
        assert (r.status_code, r.json()) == (
            400,
            error("the request body must be a JSON object (sent with Content-Type: application/json)"),
        )
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the king"}]})
    assert (r.status_code, r.json()) == (
        400,
        error(
            "the model 'run' has no chat template (use /v1/completions with a plain prompt, or add a chat_template.jinja to the run directory)",
            "messages",
        ),
    )
    r = client.get("/v1/nothing")
    assert (r.status_code, r.json()) == (404, error("Not Found: GET /v1/nothing"))


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({}, "'messages' is required", "messages"),
        ({"messages": []}, "messages must not be empty (send at least one message)", "messages"),
        ({"messages": "the king"}, 'messages must be a list of {"role": ..., "content": ...} objects with text content', "messages"),
        ({"messages": [{"content": "the"}]}, "'messages.0.role' is required", "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0]: only text content is supported", "messages.0.content"),
        ({"messages": [{"role": "system", "content": "be brief"}]}, "the chat template refused the messages: no system messages, please", "messages"),
        ({"messages": [{"role": "user", "content": LONG}]}, 'the conversation has 97 tokens, more than the model\'s context of 64 (shorten it, or send "truncate": "left" to keep its last 64 tokens)', "messages"),
        ({"messages": [{"role": "user", "content": "the"}], "max_completion_tokens": 0}, "max_tokens must be between 1 and 4096, got 0", "max_tokens"),
    ],
)  # fmt: skip
def test_bad_chat_requests_are_400s_in_openai_shape(live, body, message, param):
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert (r.status_code, r.json()) == (400, error(message, param))


def test_completion_shape_models_health_and_left_truncation(client):
    r = client.post(
        "/v1/completions",
        json={"model": "run", "prompt": ["KING:\n"], "max_tokens": 7, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "run"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": body["choices"][0]["text"], "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}

    greedy = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    cut = client.post("/v1/completions", json={"prompt": "a" + LONG, "truncate": "left", **greedy}).json()
    kept = client.post("/v1/completions", json={"prompt": LONG[-64:], **greedy}).json()
    assert cut["usage"]["prompt_tokens"] == 64 and cut["choices"][0]["text"] == kept["choices"][0]["text"]

    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["run"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["context_length"] == 64
    assert client.get("/health").json() == {"status": "ok", "active": 0, "queued": 0}


def test_a_failing_step_is_a_500_and_the_server_keeps_serving(client, monkeypatch):
    model = client.app.state.engine.model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", broken)
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert (r.status_code, r.json()) == (
        500,
        {
            "error": {
                "message": "generation failed: RuntimeError('out of memory')",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
    )
    monkeypatch.undo()
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").json() == {"status": "ok", "active": 0, "queued": 0}


def test_a_dead_engine_thread_answers_503_instead_of_hanging(run_dir):
    _, model, tokenizer = load_run(run_dir, "latest")
    with TestClient(create_app(model, tokenizer, "run")) as c:
        engine = c.app.state.engine

        def broken() -> bool:
            raise RuntimeError("a bug")

        engine.has_work = broken  # the loop itself fails, outside any step
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code in (500, 503)
        health = c.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "error")
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code == 503
        assert (
            r.json()["error"]["message"] == "the generation engine stopped: RuntimeError('a bug') (restart the server)"
        )


def test_stop_strings_cut_the_text_and_say_stop(client):
    greedy = {"prompt": "KING:\n", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    stop = full[8:10]
    stopped = client.post("/v1/completions", json={**greedy, "stop": [stop, "zzz"]}).json()["choices"][0]
    assert stopped == {"index": 0, "text": full[: full.index(stop)], "logprobs": None, "finish_reason": "stop"}


def test_openai_client_streamed_text_equals_the_whole_text(live):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run"]
    args = {"model": "run", "prompt": "ROMEO:\nthe king", "max_tokens": 40, "temperature": 0, "stop": ["crown"]}
    whole = client.completions.create(**args)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == 15 and whole.usage.completion_tokens > 0
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "the king"}]
    chat = client.chat.completions.create(model="run", messages=messages, max_tokens=20, temperature=0)
    plain = client.completions.create(model="run", prompt="ROMEO:\nthe king\n\nJULIET:\n", max_tokens=20, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text  # the template rendered as expected
    stream = list(
        client.chat.completions.create(model="run", messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert stream[0].object == "chat.completion.chunk" and stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    with pytest.raises(BadRequestError, match="top_k must be at least 1, got 0"):
        client.completions.create(model="run", prompt="the", extra_body={"top_k": 0})
    with pytest.raises(NotFoundError, match="the model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="the")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(live, stream, monkeypatch):
    engine = live.app.state.engine
    forward = engine.model.forward

    def slowed(*args, **kwargs):  # 4096 tokens now take over 8 s: far longer than noticing the client left
        time.sleep(0.002)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slowed)
    before = engine.forward_calls
    body = {"prompt": "KING:\n", "max_tokens": 4096, "temperature": 0, "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=live.url, timeout=10) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                # the iterator is kept: a dropped one is closed at once, and with it the connection (httpcore)
                lines = r.iter_lines()
                first = next(lines)
                assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
                assert http.get("/health").json()["active"] == 1
            # leaving the block closes the half-read response, and with it the connection
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                http.post("/v1/completions", json=body, timeout=0.5)
        deadline = time.time() + 10
        while http.get("/health").json() != {"status": "ok", "active": 0, "queued": 0} and time.time() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json() == {"status": "ok", "active": 0, "queued": 0}
    assert engine.forward_calls - before < 4096  # cut short, not run to its end


def test_concurrent_requests_share_forward_passes(run_dir):
    _, model, tokenizer = load_run(run_dir, "latest")
    with torch.no_grad():  # weights scaled up so that each prompt gets its own continuation
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    calls, slow = [], [False]
    forward = model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        if slow[0]:  # a bigger model's step: requests sent together (within a few ms) land in the same forward
            time.sleep(0.05)
        return forward(*args, **kwargs)

    model.forward = counted
    server = LiveServer(create_app(model, tokenizer, "run", max_batch=8))
    n, prompts = 20, ["KING:\n", "ROMEO:\nthe", "JULIET:\nlove", "the king", "good night", "sweet", "d", "crown of"]

    def complete(prompt: str) -> dict:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()

    try:
        alone = [complete(p) for p in prompts]
        start, results, barrier = len(calls), [None] * len(prompts), threading.Barrier(len(prompts))
        slow[0] = True

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = complete(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = len(calls) - start
    finally:
        server.stop()
    assert [r["usage"]["completion_tokens"] for r in results] == [n] * len(prompts)
    assert together <= n + len(prompts), f"{together} forwards for {len(prompts)} requests of {n} tokens"
    assert [r["choices"][0]["text"] for r in results] == [a["choices"][0]["text"] for a in alone]
    assert len({a["choices"][0]["text"] for a in alone}) > 1  # the continuations really differ


def test_the_page_streams_into_a_real_browser(live):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, (
        "the browser test needs Debian's chromium and chromedriver: apt-get install chromium chromium-driver "
        "(`make test` does it)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        driver.get(live.url + "/")
        assert driver.title == "gptlab"
        driver.find_element(By.ID, "prompt").send_keys("ROMEO:\nthe king")
        for field, value in [("temperature", "0"), ("top-k", ""), ("max-tokens", "30")]:
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        # count the pieces of text added to the output: streamed text arrives in many
        driver.execute_script(
            "window.pieces = 0; new MutationObserver((ms) => { window.pieces += ms.length; })"
            ".observe(document.getElementById('output'), {childList: true});"
        )
        driver.find_element(By.ID, "generate").click()
        output = driver.find_element(By.ID, "output")
        WebDriverWait(driver, 30).until(lambda d: output.get_attribute("data-state") in ("done", "error"))
        status = driver.find_element(By.ID, "status").text
        assert output.get_attribute("data-state") == "done", status
        shown = output.get_property("textContent")
        pieces = driver.execute_script("return window.pieces;")
    finally:
        driver.quit()
    body = {"prompt": "ROMEO:\nthe king", "temperature": 0, "max_tokens": 30}
    expected = httpx.post(live.url + "/v1/completions", json=body, timeout=30).json()
    assert shown == expected["choices"][0]["text"] and shown
    assert pieces > 10, pieces  # 30 tokens of single characters: the text came in as it was made
    assert re.fullmatch(
        rf"Done: {expected['usage']['completion_tokens']} tokens in [\d.]+ s \(\d+ tokens/s\), .*\.", status
    )


def test_chat_template_from_the_run_directory(run_dir, tmp_path):
    _, _, tokenizer = load_run(run_dir, "latest")
    assert load_chat_template(tmp_path, tokenizer) is None
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = "<s>user: hi<|endoftext|>assistant: yo<|endoftext|>"
    assert load_chat_template(tmp_path, tokenizer).render(messages) == rendered
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert load_chat_template(tmp_path, tokenizer).render(messages) == "[hi][yo]"  # the .jinja file wins


def test_serve_command_errors_are_one_line_exit_2(run_dir, capsys):
    assert main(["serve", str(run_dir.parent / "norun")]) == 2
    assert capsys.readouterr().err == (
        f"error: '{run_dir.parent / 'norun'}' is not a run directory (config.yaml missing) (pass the train.out_dir of a run)\n"
    )
    taken = listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    finally:
        taken.close()
    assert capsys.readouterr().err == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (pick another --port or --host, or stop what uses it)\n"
    )


def test_updates_that_queued_up_come_out_merged_and_an_error_after_the_text(run_dir):
    _, model, _ = load_run(run_dir, "latest")
    worker = EngineThread(Engine(model))

    async def drain(items: list) -> list:
        job = _Job([1], 4, SamplingParams(), (), True, asyncio.get_running_loop(), asyncio.Queue())
        for item in items:  # as if the consumer was busy while three steps went by
            job.inbox.put_nowait(item)
        got = []
        try:
            async for u in worker.updates(job):
                got.append(u)
        except APIError as e:
            got.append(e)
        return got

    try:
        steps = [Update(7, [1], "a"), Update(7, [2, 3], "bc"), Update(7, [4], "d", True, "length")]
        assert asyncio.run(drain(steps)) == [Update(7, [1, 2, 3, 4], "abcd", True, "length")]
        failed = asyncio.run(drain([*steps[:2], RuntimeError("out of memory")]))
        assert failed[0] == Update(7, [1, 2, 3], "abc")
        assert isinstance(failed[1], APIError) and failed[1].status == 500 and len(failed) == 2
    finally:
        worker.close()


def test_serve_sets_the_model_up_in_a_thread_that_has_exited(run_dir, monkeypatch):
    """So that the engine thread owns torch's only live OpenMP pool (why: the comment in serve())."""
    built, apps = [], []

    def spy(real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            built.append(threading.current_thread())
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(gptlab.serve, "create_app", spy(create_app))
    monkeypatch.setattr(gptlab.train.checkpoint, "load_run", spy(load_run))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    gptlab.serve.serve(run_dir, port=0, log_level="warning")
    try:
        assert len(built) == 2 and built[0] is built[1] is not threading.main_thread() and not built[0].is_alive()
    finally:
        apps[0].state.worker.close()


@pytest.mark.slow
def test_serve_command_serves_until_ctrl_c(run_dir):
    args = [sys.executable, "-m", "gptlab", "serve", str(run_dir), "--port", "0", "--model-name", "tiny"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'tiny' at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        deadline = time.time() + 20
        while True:
            try:
                assert httpx.get(url + "/health").json() == {"status": "ok", "active": 0, "queued": 0}
                break
            except httpx.ConnectError:
                assert time.time() < deadline
                time.sleep(0.1)
        assert "<title>gptlab</title>" in httpx.get(url + "/").text
        body = {"model": "tiny", "prompt": "KING:\n", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err


def test_serve_says_which_checkpoint_it_serves(run_dir, tmp_path, monkeypatch, capsys):
    """A fine-tune's best may be an early step: the start-up line and /v1/models name the folder and its step."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "best").write_text("step_5")  # an earlier evaluation was the best one
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    for which, folder, step in (("best", "step_5", 5), ("latest", "step_10", 10)):
        gptlab.serve.serve(run, port=0, checkpoint=which, model_name="tiny", log_level="warning")
        try:
            out = capsys.readouterr().out.splitlines()
            assert out[1] == f"checkpoint {folder} of {run} ({which}, step {step} of 10 trained)"
            with TestClient(apps[-1]) as c:
                card = c.get("/v1/models").json()["data"][0]
            assert (card["id"], card["checkpoint"], card["step"], card["latest_step"]) == ("tiny", folder, step, 10)
        finally:
            apps[-1].state.worker.close()
