"""/v1/completions' logprobs, echo, token-id prompts and lists of prompts (OpenAI's legacy shape), strict request
types, and lm-evaluation-harness's local-completions client scoring a task through `gptlab serve`."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text, scaled_model, tiny_config
from fastapi.testclient import TestClient
from test_serve import TEMPLATE, LiveServer

import gptlab.generate
from gptlab.data.shards import prepare
from gptlab.generate import Engine, SamplingParams
from gptlab.serve import create_app
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

PROMPT = "ROMEO:\nthe king"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained char-level run with a 64-token context."""
    tmp = tmp_path_factory.mktemp("logprobs")
    (tmp / "corpus.txt").write_text(make_text())
    cfg = tiny_config(tmp, tmp / "corpus.txt", "model.block_size=64", "train.max_iters=30")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


@pytest.fixture(scope="module")
def reference(run_dir: Path):
    """The run's model and tokenizer, loaded apart from the server's, for the expected numbers."""
    _, model, tokenizer = load_run(run_dir, "latest")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def live(run_dir: Path):
    _, model, tokenizer = load_run(run_dir, "latest")
    server = LiveServer(create_app(model, tokenizer, "run", chat_template=TEMPLATE))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(run_dir: Path):
    """An in-process client of the app."""
    _, model, tokenizer = load_run(run_dir, "latest")
    with TestClient(create_app(model, tokenizer, "run")) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): the model's log-probabilities of the next token after each position."""
    with torch.no_grad():
        return model(torch.tensor([ids])).float().log_softmax(-1)[0]


def check_logprobs(logprobs, ids: list[int], first: int, expected: torch.Tensor, tokenizer, top: int) -> None:
    """`logprobs` (OpenAI's object) lists ids[first:] with the log-probabilities and top-N of `expected`."""
    scored = ids[first:]
    assert logprobs.tokens == [tokenizer.decode([t]) for t in scored]
    assert logprobs.text_offset == list(range(len(scored)))  # one character per token
    for k, token in enumerate(scored):
        at = first + k - 1  # the position that predicts it
        if at < 0:
            assert logprobs.token_logprobs[k] is None and logprobs.top_logprobs[k] is None
            continue
        assert logprobs.token_logprobs[k] == pytest.approx(expected[at, token].item(), abs=1e-5)
        values, likeliest = expected[at].topk(top)
        want = {tokenizer.decode([i]): v for i, v in zip(likeliest.tolist(), values.tolist())}
        want.setdefault(tokenizer.decode([token]), expected[at, token].item())  # the chosen token is listed too
        got = logprobs.top_logprobs[k]
        assert got.keys() == want.keys() and all(got[t] == pytest.approx(v, abs=1e-5) for t, v in want.items())


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 0.7, "top_k": 3, "seed": 5}],
    ids=["greedy", "sampled"],
)
def test_logprobs_of_generated_tokens_are_the_models_log_softmax(openai_client, reference, sampling):
    """The raw distribution (as vLLM and OpenAI): temperature and top-k change what is drawn, not its score."""
    model, tokenizer = reference
    extra = {"ignore_eos": True, **({"top_k": sampling.pop("top_k")} if "top_k" in sampling else {})}
    r = openai_client.completions.create(
        model="run", prompt=PROMPT, max_tokens=10, logprobs=5, extra_body=extra, **sampling
    )
    choice = r.choices[0]
    prompt = tokenizer.encode(PROMPT)
    ids = prompt + tokenizer.encode(choice.text)
    assert r.usage.completion_tokens == 10 and len(ids) == len(prompt) + 10
    check_logprobs(choice.logprobs, ids, len(prompt), log_softmax(model, ids), tokenizer, 5)


def test_echo_with_max_tokens_0_scores_the_prompt(openai_client, reference):
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPT)
    expected = log_softmax(model, ids)
    for prompt in (PROMPT, ids):  # as text and as token ids
        r = openai_client.completions.create(model="run", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        choice = r.choices[0]
        assert (choice.text, choice.finish_reason, choice.index) == (PROMPT, "length", 0)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
        check_logprobs(choice.logprobs, ids, 0, expected, tokenizer, 2)
    # echo without logprobs: the text only
    r = openai_client.completions.create(model="run", prompt=ids, max_tokens=0, echo=True)
    assert (r.choices[0].text, r.choices[0].logprobs) == (PROMPT, None)


def test_echo_and_generation_together(openai_client, reference):
    """lm-eval's request: echo, max_tokens 1, logprobs 1; and a longer one: the generated part is what a request
    without echo generates, and its logprobs follow the prompt's."""
    model, tokenizer = reference
    prompt = tokenizer.encode(PROMPT)
    for max_tokens in (1, 6):
        args = {"model": "run", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
        plain = openai_client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0]
        echoed = openai_client.completions.create(**args, echo=True, extra_body={"ignore_eos": True}).choices[0]
        assert echoed.text == PROMPT + plain.text
        ids = prompt + tokenizer.encode(plain.text)
        check_logprobs(echoed.logprobs, ids, 0, log_softmax(model, ids), tokenizer, 1)
        assert echoed.logprobs.token_logprobs[len(prompt) :] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)


def test_lists_of_prompts_and_n_choices_are_indexed_as_openai(openai_client, reference):
    """Choice prompt_index * n + i is sample i of that prompt: what the prompt alone gives with seed + i."""
    _, tokenizer = reference
    texts = ["the king", "ROMEO:\n", "JULIET:\ngood"]
    prompts = [texts[0], texts[1], tokenizer.encode(texts[2])]  # the last one alone goes as token ids
    args = {"model": "run", "max_tokens": 6, "temperature": 1.0, "echo": True, "extra_body": {"ignore_eos": True}}
    r = openai_client.completions.create(prompt=texts, n=2, seed=11, **args)
    assert [c.index for c in r.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        for i in range(2):
            alone = openai_client.completions.create(prompt=prompt, n=1, seed=11 + i, **args).choices[0].text
            assert r.choices[p * 2 + i].text == alone and alone.startswith(texts[p])
    assert r.choices[0].text != r.choices[1].text  # the seeds differ
    prompt_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 6 * 6)
    # a list of lists of ids; a list of one string
    r = openai_client.completions.create(prompt=[tokenizer.encode(t) for t in texts], n=1, seed=11, **args)
    assert [c.text[: len(t)] for c, t in zip(r.choices, texts)] == texts
    one = openai_client.completions.create(prompt=["the king"], n=1, seed=11, **args)
    assert one.choices[0].text == r.choices[0].text


def test_streamed_logprobs_and_choices_equal_the_whole(openai_client):
    args = {"model": "run", "prompt": ["the king", "ROMEO:\n"], "max_tokens": 12, "temperature": 0, "logprobs": 3}
    args |= {"echo": True, "n": 2, "stop": [" q"], "extra_body": {"ignore_eos": True}}
    whole = openai_client.completions.create(**args)
    chunks = list(openai_client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
        for key in ("tokens", "text_offset", "token_logprobs", "top_logprobs"):
            assert sum((getattr(c.logprobs, key) for c in mine), []) == getattr(choice.logprobs, key), key


def error(message: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


UNION = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"prompt": "the", "max_tokens": True}, "'max_tokens' must be an integer, got true", "max_tokens"),
        ({"prompt": "the", "max_tokens": "16"}, "'max_tokens' must be an integer, got \"16\"", "max_tokens"),
        ({"prompt": "the", "stream": "yes"}, "'stream' must be true or false, got \"yes\"", "stream"),
        ({"prompt": "the", "temperature": "1"}, "'temperature' must be a number, got \"1\"", "temperature"),
        ({"prompt": "the", "top_p": False}, "'top_p' must be a number, got false", "top_p"),
        ({"prompt": "the", "logprobs": True}, "'logprobs' must be an integer, got true", "logprobs"),
        ({"prompt": "the", "n": 1.5}, "'n' must be an integer, got 1.5", "n"),
        ({"prompt": "the", "echo": 1}, "'echo' must be true or false, got 1", "echo"),
        ({"prompt": "the", "seed": "7"}, "'seed' must be an integer, got \"7\"", "seed"),
        ({"prompt": "the", "stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage' must be true or false, got \"yes\"", "stream_options.include_usage"),
        ({"prompt": "the", "model": 3}, "'model' must be a string, got 3", "model"),
        ({"prompt": [1, True]}, UNION, "prompt"),
        ({"prompt": ["the", 5]}, UNION, "prompt"),
        ({"prompt": {"text": "the"}}, UNION, "prompt"),
        ({"prompt": []}, "prompt is an empty list (give a prompt, or a list of prompts)", "prompt"),
        ({"prompt": [[5, 6], []]}, "prompt 1 is empty (give some text to continue)", "prompt"),
        ({"prompt": [5, 99999]}, "the prompt has the token id 99999, outside the vocabulary (ids 0 to {last})", "prompt"),
        ({"prompt": [[5], [-1]]}, "prompt 1 has the token id -1, outside the vocabulary (ids 0 to {last})", "prompt"),
        ({"prompt": [["x"]]}, UNION, "prompt"),
        ({"prompt": [5] * 65}, 'the prompt has 65 tokens, more than the model\'s context of 64 (shorten it, or send "truncate": "left" to keep its last 64 tokens)', "prompt"),
        ({"prompt": "the", "logprobs": 21}, "logprobs must be between 0 and 20, got 21", "logprobs"),
        ({"prompt": "the", "logprobs": -1}, "logprobs must be between 0 and 20, got -1", "logprobs"),
        ({"prompt": "the", "n": 0}, "n must be between 1 and 128, got 0", "n"),
        ({"prompt": "the", "max_tokens": 0}, "max_tokens must be between 1 and 4096, got 0", "max_tokens"),
        ({"prompt": "the", "max_tokens": -1, "echo": True}, "max_tokens must be between 0 and 4096, got -1", "max_tokens"),
        ({"prompt": ["the"] * 600, "n": 2}, "600 prompts times n=2 make 1200 completions, more than 1024 (send fewer prompts per request)", "prompt"),
        ({"prompt": "the", "top_logprobs": 2}, "'top_logprobs' is not supported by this server (leave it out)", "top_logprobs"),
    ],
)  # fmt: skip
def test_strict_types_and_bad_values_are_400s_naming_the_field(client, reference, body, message, param):
    model, tokenizer = reference
    r = client.post("/v1/completions", json=body)
    last = min(model.cfg.vocab_size, tokenizer.vocab_size) - 1
    assert (r.status_code, r.json()) == (400, error(message.format(last=last), param))
    assert client.get("/health").json() == {"status": "ok", "active": 0, "queued": 0}  # nothing was queued


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"max_tokens": True}, "'max_tokens' must be an integer, got true", "max_tokens"),
        ({"max_completion_tokens": "5"}, "'max_completion_tokens' must be an integer, got \"5\"", "max_completion_tokens"),
        ({"stream": "yes"}, "'stream' must be true or false, got \"yes\"", "stream"),
        ({"temperature": "1"}, "'temperature' must be a number, got \"1\"", "temperature"),
        ({"ignore_eos": "true"}, "'ignore_eos' must be true or false, got \"true\"", "ignore_eos"),
        ({"n": 0}, "n must be between 1 and 128, got 0", "n"),
    ],
)  # fmt: skip
def test_chat_request_types_are_strict_too(live, body, message, param):
    import httpx

    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "the"}], **body})
    assert (r.status_code, r.json()) == (400, error(message, param))


def test_chat_n_choices(openai_client):
    messages = [{"role": "user", "content": "the king"}]
    r = openai_client.chat.completions.create(model="run", messages=messages, n=3, max_tokens=8, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens > 0
    alone = openai_client.chat.completions.create(model="run", messages=messages, n=1, max_tokens=8, seed=4)
    assert r.choices[1].message.content == alone.choices[0].message.content


def test_openai_client_sees_the_400(openai_client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="'max_tokens' must be an integer, got true"):
        openai_client.completions.create(model="run", prompt="the", max_tokens=True)


def test_tokenizer_endpoints_as_vllms(client, reference):
    """/tokenize, /detokenize and /tokenizer_info: what lm-eval's remote tokenizer reads."""
    _, tokenizer = reference
    r = client.post("/tokenize", json={"prompt": "the king<|endoftext|>", "add_special_tokens": False}).json()
    ids = tokenizer.encode("the king<|endoftext|>", allow_special=True)
    assert r == {"count": len(ids), "max_model_len": 64, "tokens": ids} and ids[-1] == tokenizer.eos_id
    # as plain text (what /v1/completions does with a text prompt), a char vocabulary has no '<' for it
    r = client.post("/tokenize", json={"prompt": "the<|endoftext|>", "allow_special": False})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("'<|endoftext|>' is read as plain text")
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "the king<|endoftext|>"}
    info = client.get("/tokenizer_info").json()
    assert (info["eos_token"], info["model_max_length"], info["chat_template"]) == ("<|endoftext|>", 64, None)
    r = client.post("/detokenize", json={"tokens": [1, 10**6]})
    last = tokenizer.vocab_size - 1
    assert (r.status_code, r.json()) == (
        400, error(f"tokens has the token id 1000000, outside the vocabulary (ids 0 to {last})", "tokens")
    )  # fmt: skip
    r = client.post("/tokenize", json={"prompt": 5})
    assert (r.status_code, r.json()) == (400, error("'prompt' must be a string, got 5", "prompt"))
    r = client.post("/tokenize", json={"prompt": "caf\u00e9"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("text has characters outside")


# ----- the engine ----------------------------------------------------------------------------------------------
def run_all(engine: Engine) -> dict[int, dict]:
    """Step an engine until idle; each request's tokens, logprobs, prompt logprobs and finish reason."""
    out: dict[int, dict] = {}
    while engine.has_work():
        for u in engine.step():
            r = out.setdefault(u.id, {"tokens": [], "logprobs": [], "prompt": None, "reason": None})
            r["tokens"] += u.token_ids
            r["logprobs"] += u.logprobs or []
            r["prompt"] = u.prompt_logprobs if u.prompt_logprobs is not None else r["prompt"]
            r["reason"] = u.finish_reason
    return out


def test_engine_scores_prompts_in_one_forward_without_cache_rows(monkeypatch):
    model = scaled_model(vocab_size=40, block_size=16)
    engine = Engine(model, max_batch=8)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [3] * 16, [11]]
    params = SamplingParams(temperature=0, logprobs=4, prompt_logprobs=4)
    ids = [engine.submit(p, k % 2, params) for k, p in enumerate(prompts)]  # max_new_tokens 0 and 1
    got = run_all(engine)
    assert engine.forward_calls == 1 and engine.cache is None  # one scoring forward; no row was ever cached
    for i, prompt in zip(ids, prompts):
        expected = log_softmax(model, prompt)
        scored = got[i]["prompt"]
        assert scored[0] is None and len(scored) == len(prompt)
        for k, entry in enumerate(scored[1:]):
            assert entry.token == prompt[k + 1]
            assert entry.logprob == pytest.approx(expected[k, prompt[k + 1]].item(), abs=1e-5)
            assert [t for t, _ in entry.top] == expected[k].topk(4).indices.tolist()
        if i % 2:  # the one generated token: the argmax after the prompt, scored
            assert got[i]["tokens"] == [expected[-1].argmax().item()]
            assert got[i]["logprobs"][0].logprob == pytest.approx(expected[-1].max().item(), abs=1e-5)
        else:
            assert got[i]["tokens"] == [] and got[i]["logprobs"] == [] and got[i]["reason"] == "length"

    # a budget of logits smaller than one prompt: one forward per prompt, the same numbers
    monkeypatch.setattr(gptlab.generate, "SCORE_LOGITS", 1)
    engine = Engine(model, max_batch=8)
    for k, p in enumerate(prompts):
        engine.submit(p, k % 2, params)
    again = run_all(engine)
    assert engine.forward_calls == len(prompts)
    for a, b in zip(again.values(), got.values(), strict=True):
        assert [e.logprob for e in a["prompt"][1:]] == pytest.approx([e.logprob for e in b["prompt"][1:]], abs=1e-6)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3, "top_p": 0.9}])
def test_engine_logprobs_change_nothing_generated_and_cost_nothing_unasked(monkeypatch, sampling):
    model = scaled_model(vocab_size=40, block_size=16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7]]

    def generate(**report: int) -> dict[int, dict]:
        engine = Engine(model, max_batch=2)  # fewer rows than requests: some wait, the windows slide past 16
        for p in prompts:
            engine.submit(p, 12, SamplingParams(**sampling, **report))
        return run_all(engine)

    asked = generate(logprobs=2, prompt_logprobs=2)
    monkeypatch.setattr(gptlab.generate, "token_logprobs", None)  # a plain request never computes any
    plain = generate()
    assert [r["tokens"] for r in asked.values()] == [r["tokens"] for r in plain.values()]
    assert all(r["logprobs"] == [] and r["prompt"] is None for r in plain.values())
    for r in asked.values():
        assert [e.token for e in r["logprobs"]] == r["tokens"]


def test_an_end_token_that_stops_a_request_is_scored():
    """lm-eval drops the last entry (the generated token): an end token must be there even though not shown."""
    model = scaled_model(vocab_size=40, block_size=16)
    prompt = [1, 2, 3]
    expected = log_softmax(model, prompt)
    end = expected[-1].argmax().item()
    engine = Engine(model, eos_id=end)
    i = engine.submit(prompt, 1, SamplingParams(temperature=0, logprobs=0, prompt_logprobs=0))
    got = run_all(engine)[i]
    assert (got["tokens"], got["reason"]) == ([], "stop")
    (entry,) = got["logprobs"]
    assert (entry.token, entry.top) == (end, ()) and entry.logprob == pytest.approx(expected[-1, end].item(), abs=1e-5)
    assert len(got["prompt"]) == 3


# ----- lm-evaluation-harness ------------------------------------------------------------------------------------
TASK = """task: gptlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def greedy_word(model, tokenizer, context: str) -> list[str]:
    """The word the model continues `context` with greedily after a space, when it puts a space first."""
    ids = tokenizer.encode(context)
    for _ in range(12):
        ids.append(log_softmax(model, ids)[-1].argmax().item())
    text = tokenizer.decode(ids)[len(context) :]
    word = text[1:].split(" ")[0].split("\n")[0].split(".")[0]
    return [word] if text.startswith(" ") and word else []


@pytest.mark.slow
def test_lm_eval_local_completions_scores_like_the_model(run_dir, reference, live, tmp_path):
    """`lm_eval --model local-completions` against the server: its per-request log-likelihoods (and greedy flags,
    and accuracy) are the model's own, with token-id requests and text requests."""
    pytest.importorskip("lm_eval")
    from gptlab.interop.runs import export

    model, tokenizer = reference
    folder = export(run_dir, tmp_path / "export", "latest")  # the tokenizer lm-eval counts context tokens with
    docs = [
        {"context": PROMPT, "choices": ["queen", "sword", "night"], "label": 0},
        {"context": "JULIET:\ngood", "choices": ["night", "day"], "label": 1},
        {"context": "KING:\nthe", "choices": ["crown", *greedy_word(model, tokenizer, "KING:\nthe")], "label": 1},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK.format(data=tmp_path / "mc.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    exported = f",tokenizer={folder},tokenizer_backend=huggingface"
    # token ids and texts counted with the exported tokenizer; ids counted by the server's /tokenize (no tokenizer
    # given: lm-eval finds the server's tokenizer endpoints)
    for k, (tokenized, batch, tokenizer_args) in enumerate(
        [("True", 4, exported), ("False", 3, exported), ("True", 2, "")]
    ):
        out = tmp_path / f"out-{k}"
        args = f"model=run,base_url={live.url}/v1/completions{tokenizer_args},tokenized_requests={tokenized}"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--tasks",
               "gptlab_mc", "--include_path", str(tmp_path / "tasks"), "--batch_size", str(batch),
               "--output_path", str(out), "--log_samples"]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        backend = "remote" if not tokenizer_args else "huggingface"
        assert f"Using tokenizer {backend}" in done.stderr
        samples = [json.loads(line) for f in glob.glob(f"{out}/**/samples_gptlab_mc_*.jsonl", recursive=True)
                   for line in open(f)]  # fmt: skip
        assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
        correct, greedy_seen = [], False
        for sample in samples:
            lls = []
            for k, (resp,) in enumerate(sample["resps"]):
                context, continuation = sample["arguments"][f"gen_args_{k}"].values()
                ctx, ids = tokenizer.encode(context), tokenizer.encode(context + continuation)
                expected = log_softmax(model, ids)
                cont = ids[len(ctx) :]
                scores = expected[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None])[:, 0]
                is_greedy = bool((expected[len(ctx) - 1 : -1].argmax(-1) == torch.tensor(cont)).all())
                assert float(resp[0]) == pytest.approx(scores.sum().item(), abs=1e-4)
                assert resp[1] == str(is_greedy)
                greedy_seen |= is_greedy
                lls.append(scores.sum().item())
            correct.append(float(max(range(len(lls)), key=lls.__getitem__) == sample["doc"]["label"]))
            assert sample["acc"] == correct[-1]
        assert greedy_seen  # the greedy flag was exercised, not only "False"
        results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
        assert results["results"]["gptlab_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
