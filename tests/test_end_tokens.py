"""A model ends where it says it ends: its own eos_token_id (an id or a list), the tokenizer's end of text and the
chat template's end of turn, in `gptlab sample`, the engine, the server and the export; no end marker in the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_text
from fastapi.testclient import TestClient

from gptlab.chat import ChatTemplate, end_of_turn, end_token_ids
from gptlab.cli import main
from gptlab.config import load_config, to_yaml
from gptlab.generate import Engine, SamplingParams, TextOutput
from gptlab.serve import run_app
from gptlab.tokenizers import Tokenizer
from gptlab.train.checkpoint import load_run

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
STYLES = {  # specials, generation_config's eos_token_id (names), the token the model ends its reply with, template
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_end|>", CHATML),
    "llama3": (
        ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ["<|end_of_text|>", "<|eot_id|>"],
        "<|eot_id|>",
        LLAMA3,
    ),
    # a base model whose generation_config.json names a plain token too: transformers stops there, so must gptlab
    "plain": (["<|endoftext|>"], ["<|endoftext|>", "."], ".", None),
}
WORD = " king"  # the instruct model's whole reply: this token, then its end token


def instruct_model(folder: Path, style: str) -> tuple[Tokenizer, list[int]]:
    """A Llama saved by `transformers` whose greedy reply to anything is WORD then its end token (it never says
    eos_token itself), with its end tokens in generation_config.json as an instruct model has them."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials, eos, end, template = STYLES[style]
    tokenizer = Tokenizer.train("bpe", [make_text(100)], 300, specials)
    word, stop = tokenizer.hf.token_to_id(WORD.replace(" ", "Ġ")), tokenizer.hf.token_to_id(end)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None))  # fmt: skip
    with torch.no_grad():  # dimension 1 is always on and says WORD; WORD's embedding turns on dimension 0: the end
        emb, head = hf.model.embed_tokens.weight, hf.lm_head.weight
        emb[:, :2] = 0
        emb[:, 1] = 10.0
        emb[word, 0] = 1000.0
        head[:, :2] = 0
        head[word, 1] = 5.0
        head[stop, 0] = 50.0
    names = [eos] if isinstance(eos, str) else eos
    ids = [tokenizer.hf.token_to_id(n) for n in names]
    hf.generation_config = GenerationConfig(eos_token_id=ids if isinstance(eos, list) else ids[0])
    hf.save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.hf, eos_token=specials[0], chat_template=template
    ).save_pretrained(folder)
    return tokenizer, [word, stop]


@pytest.fixture(scope="module", params=list(STYLES))
def imported(request, tmp_path_factory) -> tuple[str, Path, list[int]]:
    tmp = tmp_path_factory.mktemp(request.param)
    _, greedy = instruct_model(tmp / "hf", request.param)
    assert main(["import", "hf", str(tmp / "hf"), str(tmp / "run")]) == 0
    return request.param, tmp, greedy


def test_transformers_itself_stops_at_the_end_token(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tmp, greedy = imported
    hf, tok = AutoModelForCausalLM.from_pretrained(tmp / "hf"), AutoTokenizer.from_pretrained(tmp / "hf")
    inputs = tok("the queen", return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert out.tolist() == greedy  # the reference: WORD, the end token, and nothing after


def test_the_imported_run_keeps_the_models_end_tokens(imported):
    style, tmp, _ = imported
    cfg, _, tokenizer = load_run(tmp / "run")
    assert (
        cfg.sample.end_tokens
        == {
            "chatml": ["<|im_end|>", "<|endoftext|>"],
            "llama3": ["<|end_of_text|>", "<|eot_id|>"],
            "plain": ["<|endoftext|>", "."],
        }[style]
    )


def test_gptlab_sample_stops_at_the_end_token_and_prints_no_marker(imported, capsys):
    style, tmp, _ = imported
    sample = ["sample", str(tmp / "run"), "--start", "the queen", "--temperature", "0", "--num-samples", "1"]
    assert main(sample) == 0
    assert capsys.readouterr().out == "the queen" + WORD + "\n"
    if style == "plain":
        return
    # as a chat fine-tune of a base model has it: the base's end of text only; the template's end of turn still ends
    saved = (tmp / "run" / "config.yaml").read_text()
    cfg = load_config(tmp / "run" / "config.yaml")
    cfg.sample.end_tokens = STYLES[style][0][:1]
    (tmp / "run" / "config.yaml").write_text(to_yaml(cfg))
    try:
        assert main(sample) == 0
        assert capsys.readouterr().out == "the queen" + WORD + "\n"
    finally:
        (tmp / "run" / "config.yaml").write_text(saved)


def test_the_server_stops_at_the_end_token_with_finish_reason_stop(imported):
    style, tmp, _ = imported
    app, _, _ = run_app(tmp / "run", "m", device="cpu")
    with TestClient(app) as c:
        body = {"model": "m", "prompt": "the queen", "max_tokens": 50, "temperature": 0}
        got = c.post("/v1/completions", json=body).json()
        assert (got["choices"][0]["text"], got["choices"][0]["finish_reason"]) == (WORD, "stop")
        assert got["usage"]["completion_tokens"] == 1
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == WORD
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert c.get("/tokenizer_info").json()["eos_token"] == load_run(tmp / "run")[0].sample.end_tokens[0]
        if style == "plain":  # no chat template
            return
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 0}
        got = c.post("/v1/chat/completions", json=body).json()
        assert (got["choices"][0]["message"]["content"], got["choices"][0]["finish_reason"]) == (WORD, "stop")
        body |= {"stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == WORD
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_export_carries_the_end_tokens(imported):
    style, tmp, greedy = imported
    assert main(["export", str(tmp / "run"), str(tmp / "out")]) == 0
    generation = json.loads((tmp / "out" / "generation_config.json").read_text())
    config = json.loads((tmp / "out" / "config.json").read_text())
    _, _, tokenizer = load_run(tmp / "run")
    ends = [tokenizer.hf.token_to_id(t) for t in load_run(tmp / "run")[0].sample.end_tokens]
    assert generation["eos_token_id"] == ends and config["eos_token_id"] == ends[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, tok = AutoModelForCausalLM.from_pretrained(tmp / "out"), AutoTokenizer.from_pretrained(tmp / "out")
    inputs = tok("the queen", return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert out.tolist() == greedy


def test_a_trained_runs_template_end_of_turn_ends_replies():
    """A chat-tuned run's template ends each assistant turn with <|end|>: replies stop there, without the marker."""
    tokenizer = Tokenizer.train("char", ["abc"], 0, ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"))
    phi3 = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    template = ChatTemplate(phi3)
    assert end_of_turn(template, tokenizer) == "<|end|>"
    assert end_token_ids(tokenizer, template) == [tokenizer.special_ids[t] for t in ("<|endoftext|>", "<|end|>")]
    assert end_of_turn(ChatTemplate("{{ raise_exception('system first') }}"), tokenizer) is None
    # a chat fine-tune inherits its base's end tokens (GPT-2's <|endoftext|>): its own template's end still ends turns
    assert end_token_ids(tokenizer, template, ["<|endoftext|>"]) == end_token_ids(tokenizer, template)
    with pytest.raises(Exception, match="end token '<|eot|>' is not in the tokenizer's vocabulary"):
        end_token_ids(tokenizer, template, ["<|eot|>"])


def test_end_tokens_never_reach_the_text_even_when_generation_goes_past_them():
    from conftest import scaled_model

    tokenizer = Tokenizer.train("char", ["abcdefgh"], 0, ("<|endoftext|>", "<|end|>"))
    model = scaled_model(tokenizer.vocab_size, 16)
    end = tokenizer.special_ids["<|end|>"]
    engine = Engine(model, tokenizer, eos_id=[tokenizer.eos_id, end])
    with torch.no_grad():
        model.lm_head.weight[end] += 100  # the model says <|end|> every time
    rid = engine.submit(tokenizer.encode("ab"), 3, SamplingParams(temperature=0), stop_at_eos=False)
    updates = []
    while engine.has_work():
        updates += [u for u in engine.step() if u.id == rid]
    assert [t for u in updates for t in u.token_ids] == [end, end, end]  # the ids are there for who asks
    assert "".join(u.text for u in updates) == ""  # the text never shows them


def test_a_stop_string_never_cuts_a_special_token_in_two():
    tokenizer = Tokenizer.train("char", ["abc"], 0, ("<|endoftext|>", "<|im_end|>"))
    out = TextOutput(tokenizer, ["im_end"])
    text, stopped = out.push(tokenizer.encode("a")[0], final=False)
    assert (text, stopped) == ("a", False)
    text, stopped = out.push(tokenizer.special_ids["<|im_end|>"], final=False)
    assert (text, stopped, out.text) == ("", True, "a")  # cut before the special, not after its "<|"
