"""lm-evaluation-harness: `lm_eval --model gptlab` gives what `lm_eval --model hf` gives on the run's export.

A run trained here (byte-level BPE, no BOS token) is exported with `gptlab export`; small local tasks (YAML over
JSONL files the test writes: multiple choice, with and without a context; rolling log-likelihood; greedy generation
with stop strings) run through lm-eval's own CLI in subprocesses, once with `--model gptlab` on the run and once
with `--model hf` on the export, and their per-request samples (`--log_samples`) are compared. Offline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_text, tiny_config
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.interop.harness import GptlabLM
from gptlab.interop.runs import export
from gptlab.tokenizers import Tokenizer
from gptlab.train.trainer import Trainer

TASKS = ("tiny_mc", "tiny_bare", "tiny_roll", "tiny_gen")
MAX_GEN = 24
# lm-eval's CLI (the function its `lm_eval` script runs), after importing the plugin: how these tests run it whether
# or not gptlab's entry point is installed (test_lm_eval_finds_gptlab_by_its_entry_point checks that one)
CLI = "import sys, gptlab.interop.harness; from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())"

TASK_YAML = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "tiny_bare": """output_type: multiple_choice
doc_to_text: ""
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "tiny_roll": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
    "tiny_gen": f"""output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " king."
generation_kwargs: {{until: [".", "\\n\\n"], max_gen_toks: {MAX_GEN}, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}


def write_tasks(folder: Path) -> None:
    """The tasks' YAML files and their JSONL data: 20 questions of 4 choices, 12 texts of 3-5 context windows."""
    rng = random.Random(1)
    questions = []
    for _ in range(20):
        question = f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}:\n" + " ".join(rng.sample(WORDS, rng.randint(2, 6)))
        choices = [" " + " ".join(rng.sample(WORDS, rng.randint(1, 3))) + "." for _ in range(4)]
        questions.append({"question": question, "choices": choices, "label": rng.randrange(4)})
    scenes = make_text(96, seed=3).split("\n\n")
    texts = [{"text": "\n\n".join(scenes[i : i + 8])} for i in range(0, 96, 8)]
    folder.mkdir()
    for name, rows in (("questions", questions), ("texts", texts)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, body in TASK_YAML.items():
        data = folder / ("texts.jsonl" if task == "tiny_roll" else "questions.jsonl")
        head = f"task: {task}\ndataset_path: json\ndataset_kwargs: {{data_files: '{data}'}}\ntest_split: train\n"
        (folder / f"{task}.yaml").write_text(head + body)


def lm_eval_env(tmp: Path) -> dict[str, str]:
    """No hub access, and the datasets cache inside the test's folder."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "ds"),
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def run_lm_eval(tmp: Path, model: str, model_args: str, out: Path) -> dict:
    """lm-eval's CLI on the tasks; returns {"results": ..., task: [samples by doc_id]}."""
    args = ["--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS), "--include_path",
            str(tmp / "tasks"), "--device", "cpu", "--log_samples", "--output_path", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=lm_eval_env(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    found = {"results": json.loads(next(out.rglob("results_*.json")).read_text())["results"]}
    for task in TASKS:
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        found[task] = sorted(rows, key=lambda r: r["doc_id"])
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A run trained to say something (about 3 s), its export and the tasks."""
    tmp = tmp_path_factory.mktemp("harness")
    (tmp / "corpus.txt").write_text(make_text())
    cfg = tiny_config(tmp, tmp / "corpus.txt", "data.tokenizer=bpe", "data.vocab_size=300", "model.block_size=64",
                      "train.max_iters=600", "train.eval_interval=300", "train.lr=3e-3")  # fmt: skip
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    export(cfg.train.out_dir, tmp / "hf")
    write_tasks(tmp / "tasks")
    return {"tmp": tmp, "run": Path(cfg.train.out_dir)}


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    """Both models' lm-eval results on the tasks: gptlab in batches of 16 (a question's choices sharing their
    context), HF one request at a time (lm-eval's default)."""
    tmp, run = trained["tmp"], trained["run"]
    return {
        "run": run,
        "gptlab": run_lm_eval(tmp, "gptlab", f"run={run},batch_size=16", tmp / "out_gptlab"),
        "hf": run_lm_eval(tmp, "hf", f"pretrained={tmp / 'hf'}", tmp / "out_hf"),
    }


def loglikelihoods(samples: list[dict]) -> list[tuple[float, str]]:
    """(log-likelihood, is_greedy) of every request of a multiple-choice task's samples, in order."""
    return [(float(r[0][0]), r[0][1]) for s in samples for r in s["resps"]]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tiny_mc", "tiny_bare"])
def test_multiple_choice_equals_hf(evaluated, task):
    ours, theirs = evaluated["gptlab"], evaluated["hf"]
    a, b = loglikelihoods(ours[task]), loglikelihoods(theirs[task])
    assert len(a) == len(b) == 80
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 1e-4
    assert [g for _, g in a] == [g for _, g in b]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric], abs=1e-3)
    assert len({round(x, 3) for x, _ in a}) > 40  # real, varied scores: not all requests alike


@pytest.mark.slow
def test_rolling_loglikelihood_equals_hf(evaluated):
    ours, theirs = evaluated["gptlab"]["tiny_roll"], evaluated["hf"]["tiny_roll"]
    a, b = [float(s["resps"][0][0]) for s in ours], [float(s["resps"][0][0]) for s in theirs]
    assert len(a) == 12 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    tokenizer = Tokenizer.load(evaluated["run"] / "tokenizer.json")
    assert max(len(tokenizer.encode(s["doc"]["text"])) for s in ours) > 2 * 64  # several windows of the context
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, want = evaluated["gptlab"]["results"]["tiny_roll"][metric], evaluated["hf"]["results"]["tiny_roll"][metric]
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_greedy_generations_equal_hf(evaluated):
    ours, theirs = evaluated["gptlab"]["tiny_gen"], evaluated["hf"]["tiny_gen"]
    a, b = [s["resps"][0][0] for s in ours], [s["resps"][0][0] for s in theirs]
    assert a == b and sum(map(bool, a)) >= 10  # some stop at once (".")
    tokenizer = Tokenizer.load(evaluated["run"] / "tokenizer.json")
    assert not any("." in t or "\n\n" in t for t in a)
    assert any(len(tokenizer.encode(t)) < MAX_GEN for t in a)  # a stop string ended some before max_gen_toks


def test_lm_eval_finds_gptlab_by_its_entry_point(tmp_path):
    """`lm_eval --model gptlab` resolves in a fresh interpreter that never imported gptlab (installed package)."""
    points = metadata.distribution("gptlab").entry_points.select(group="lm_eval.models")
    assert [(p.name, p.value) for p in points] == [("gptlab", "gptlab.interop.harness:GptlabLM")]
    code = (
        "import sys; from lm_eval.api.registry import get_model; assert 'gptlab.interop.harness' not in sys.modules; "
        "print(get_model('gptlab').__module__, get_model('hf').__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=lm_eval_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["gptlab.interop.harness", "HFLM"]


def test_model_args_from_the_cli_and_user_errors(trained):
    assert get_model("gptlab") is GptlabLM
    run = trained["run"]
    # the CLI always sends batch_size (1 unless told) and device (cuda:0 unless told): model_args win, not collide
    lm = GptlabLM.create_from_arg_string(f"run={run},batch_size=4,device=cpu", {"batch_size": 1, "device": "cuda:0"})
    assert (lm.batch_size, str(lm.device), lm.max_length) == (4, "cpu", 64)
    lm = GptlabLM.create_from_arg_string(f"run={run},max_length=32", {"batch_size": "8", "device": "cpu"})
    assert (lm.batch_size, lm.max_length) == (8, 32)
    assert GptlabLM.create_from_arg_obj({"run": str(run)}, {"batch_size": 1, "device": "cpu"}).batch_size == 16
    cases = {
        "": "lm_eval --model gptlab needs a run directory (pass --model_args run=RUN_DIR)",
        f"run={run / 'nope'}": f"'{run / 'nope'}' is not a gptlab run directory (config.yaml missing) (model_args are "
        "run=RUN_DIR[,checkpoint=best|latest|step_N,device=auto|cpu|cuda,batch_size=N,max_length=N,"
        "dtype=float32|bfloat16|float16])",
        f"run={run},batchsize=4": "unknown model_args key 'batchsize' for lm_eval --model gptlab (did you mean "
        "batch_size? model_args are run=RUN_DIR[,checkpoint=best|latest|step_N,device=auto|cpu|cuda,batch_size=N,"
        "max_length=N,dtype=float32|bfloat16|float16])",
        f"run={run},batch_size=0": "batch_size=0 is not a positive whole number (e.g. batch_size=16)",
        f"run={run},max_length=65": "max_length=65 is not a length from 2 to the run's context of 64 (leave "
        "max_length out (the context, 64) or give a smaller one)",
        f"run={run},dtype=fp8": "unknown dtype 'fp8' in model_args (use dtype=float32, bfloat16 or float16)",
        f"run={run},checkpoint=step_999": f"checkpoint '{run / 'checkpoints' / 'step_999'}' is missing (pick another "
        "checkpoint, e.g. --checkpoint latest)",
    }
    if not torch.cuda.is_available():
        cases[f"run={run},device=cuda"] = (
            "device 'cuda' was asked for but CUDA is not available (use device=auto or device=cpu in --model_args)"
        )
    for args, message in cases.items():
        with pytest.raises(GptlabError) as e:
            GptlabLM.create_from_arg_string(args, {"device": "cpu"})
        assert str(e.value) == message


def test_chat_template_renders_as_hf(trained, tmp_path):
    """--apply_chat_template: the run's template gives lm-eval the text its HF model renders from the export."""
    run = tmp_path / "chat_run"
    shutil.copytree(trained["run"], run)
    (run / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (run / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    export(run, tmp_path / "chat_hf")
    ours = GptlabLM(run=str(run), device="cpu")
    theirs = HFLM(pretrained=str(tmp_path / "chat_hf"), device="cpu")
    chats = [
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "ROMEO:"}], True),
        ([{"role": "user", "content": "KING:"}, {"role": "assistant", "content": "the king "}], False),
        ([{"role": "user", "content": "KING:"}, {"role": "assistant", "content": "sweet"}], False),
    ]
    for chat, prompt in chats:
        assert ours.apply_chat_template(chat, prompt) == theirs.apply_chat_template(chat, prompt)
    assert ours.apply_chat_template(chats[1][0], False).endswith("<|im_start|>assistant\nthe king ")
    assert (ours.prefix_token_id, ours.eot_token_id) == (theirs.prefix_token_id, theirs.eot_token_id)
    with pytest.raises(GptlabError, match="has no chat template"):
        GptlabLM(run=str(trained["run"]), device="cpu").apply_chat_template(chats[0][0])


def test_generation_settings(trained):
    """A request's sampling settings reach the engine (seeded: repeatable); ones it lacks are user errors."""
    lm = GptlabLM(run=str(trained["run"]), device="cpu")

    def ask(kwargs: dict) -> list[str]:
        return lm.generate_until([Instance("generate_until", {}, ("KING:", kwargs), 0)], disable_tqdm=True)

    sampled = {"until": ["\n\n"], "do_sample": True, "temperature": 0.9, "seed": 3, "max_gen_toks": 12}
    assert ask(sampled) == ask(sampled) != ask({**sampled, "seed": 4})
    cases = {
        "num_beams": "generation setting 'num_beams' is not one gptlab's engine has (use only until, max_gen_toks, "
        "do_sample and min_p, repetition_penalty, seed, temperature, top_k, top_p)",
        "max_gen_toks": "a request asks for 64 new tokens, which leaves no room for a prompt in the run's context of "
        "64 (lower the task's max_gen_toks)",
        "top_p": "a request's generation settings are refused: top_p must be in (0, 1], got 1.5 (fix the task's "
        "generation_kwargs)",
    }
    for key, message in cases.items():
        with pytest.raises(GptlabError) as e:
            ask({"until": ["."], "do_sample": True, key: {"num_beams": 4, "max_gen_toks": 64, "top_p": 1.5}[key]})
        assert str(e.value) == message
