"""End-to-end runs of the real `gptlab` command on a tiny model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_text

ROOT = Path(__file__).resolve().parents[1]


def gptlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(make_text())
    return tmp_path


TINY = [
    "data.source=corpus.txt", "data.dir=data", "train.out_dir=run",
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
    "--max_iters=10", "--eval_interval=5", "--eval_iters=2", "train.warmup_iters=2",
]  # fmt: skip


@pytest.mark.slow
def test_prepare_train_resume_sample(workdir):
    r = gptlab("prepare", str(ROOT / "configs/tiny.yaml"), *TINY, cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("prepared: data (")
    r = gptlab("train", str(ROOT / "configs/tiny.yaml"), *TINY, "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 10 steps into run, val loss ")
    r = gptlab("train", "--resume", "run", "train.max_iters=15", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 15 steps into run")

    (workdir / "prompt.txt").write_text("KING:\n")
    r = gptlab(
        "sample", "run", "--start", "FILE:prompt.txt", "--num_samples", "2", "--max-new-tokens", "30",
        "--temperature", "0.8", "--top-k", "10", "--top-p", "0.95", "--seed", "1", cwd=workdir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("KING:\n") for s in samples)
    assert len(samples[0]) == len("KING:\n") + 30 + 1  # 30 characters and print's newline
    again = gptlab("sample", "run", "--start", "KING:\n", "--num-samples", "2", "--max_new_tokens", "30",
                   "--temperature", "0.8", "--top_k", "10", "--top_p", "0.95", "--seed", "1", cwd=workdir)  # fmt: skip
    assert again.stdout == r.stdout  # the same seed gives the same text
    # one sample streams; a stop string cuts it right before the stop
    greedy = gptlab("sample", "run", "--start", "KING:\n", "--num-samples", "1", "--max-new-tokens", "30",
                    "--temperature", "0", cwd=workdir).stdout  # fmt: skip
    text = greedy[len("KING:\n") : -1]
    assert len(text) == 30
    stop = text[10:12]
    cut = gptlab("sample", "run", "--start", "KING:\n", "--num-samples", "1", "--max-new-tokens", "30",
                 "--temperature", "0", "--stop", stop, cwd=workdir).stdout  # fmt: skip
    assert cut == "KING:\n" + text[: text.index(stop)] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "model.n_layers=2"], "error: unknown config key 'model.n_layers' in overrides (did you mean 'model.n_layer'?)\n"),
        (["train", "missing.yaml"], "error: config file 'missing.yaml' not found (pass a YAML file, e.g. configs/shakespeare-char.yaml)\n"),
        (["train", "data.dir=nowhere"], "error: no prepared data in 'nowhere' (meta.json missing) (run `gptlab prepare` with data.dir=nowhere)\n"),
        (["prepare", "data.source=corpus.bin", "data.dir=d"], "error: 'corpus.bin' is not valid UTF-8 at byte 2 (convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8, or pass --errors replace)\n"),
        (["sample", "norun"], "error: 'norun' is not a run directory (config.yaml missing) (pass the train.out_dir of a run)\n"),
        (["train", "--resume", "norun"], "error: no run to resume in 'norun' (config.yaml missing) (check the path)\n"),
        (["train", "--bogus"], "error: unknown option '--bogus' (see `gptlab --help`; overrides are written key=value)\n"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(workdir, args, message):
    (workdir / "corpus.bin").write_bytes(b"ab\xfe\xff")
    r = gptlab(*args, cwd=workdir)
    assert (r.returncode, r.stderr) == (2, message)
    assert "Traceback" not in r.stdout + r.stderr


def test_debug_shows_the_traceback(workdir):
    r = gptlab("--debug", "train", "model.n_layers=2", cwd=workdir)
    assert r.returncode == 1 and "Traceback" in r.stderr and "GptlabError" in r.stderr


@pytest.mark.slow
def test_sample_errors(workdir):
    assert gptlab("prepare", *TINY, cwd=workdir).returncode == 0
    assert gptlab("train", *TINY, "--quiet", cwd=workdir).returncode == 0
    r = gptlab("sample", "run", "--start", "ROMEO: \u00e9", cwd=workdir)
    assert (r.returncode, r.stderr) == (
        2,
        "error: text has characters outside the tokenizer's vocabulary: '\u00e9' "
        "(remove them from the prompt, or prepare data that contains them)\n",
    )
    r = gptlab("sample", "run", "--start", "the " * 10, cwd=workdir)
    assert (r.returncode, r.stderr) == (
        2,
        "error: the prompt has 40 tokens, more than the context of 16 (shorten --start, or pass --truncate to keep its end)\n",
    )
    r = gptlab("sample", "run", "--start", "the " * 10, "--truncate", "--num-samples", "1", "--max-new-tokens", "5",
               "--temperature", "0", cwd=workdir)  # fmt: skip
    assert r.returncode == 0 and r.stdout == "the " * 10 + r.stdout[40:] and len(r.stdout) == 40 + 5 + 1
    r = gptlab("train", *TINY, cwd=workdir)
    assert r.returncode == 2 and r.stderr.startswith("error: run directory 'run' already exists")
    bad = {
        "--top-k=0": "error: --top-k must be at least 1, got 0 (or leave it unset)\n",
        "--top-p=-0.5": "error: --top-p must be in (0, 1], got -0.5 (e.g. 0.95, or leave it unset)\n",
        "--temperature=nan": "error: --temperature must be a finite number >= 0, got nan (0 is greedy)\n",
        "--num-samples=0": "error: --num-samples must be at least 1, got 0 (ask for 1 or more samples)\n",
        "--min-p=2": "error: --min-p must be in [0, 1], got 2.0 (e.g. 0.05, or leave it unset)\n",
        "--repetition-penalty=0": "error: --repetition-penalty must be a finite number > 0, got 0.0 (1.0 is none)\n",
    }
    for flag, message in bad.items():
        r = gptlab("sample", "run", "--start", "the", flag, cwd=workdir)
        assert (r.returncode, r.stderr) == (2, message)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(workdir):
    import json
    import signal
    import time

    assert gptlab("prepare", *TINY, cwd=workdir).returncode == 0
    args = [sys.executable, "-m", "gptlab", "train", *TINY, "--max_iters=100000", "--quiet"]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # not 0: a script must not take the run for a finished one
    assert "Traceback" not in err
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (workdir / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{last_step}"
    assert out == "" and err.splitlines()[-1].startswith(f"interrupted at step {last_step}: saved checkpoint")


def test_bench_reports_time_throughput_and_mfu(workdir):
    r = gptlab(
        "bench", str(ROOT / "configs/tiny.yaml"), "--steps", "2", "--warmup", "1", "train.device=cpu", cwd=workdir
    )
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(
        r"0\.\d\dM params on cpu \(torch\.float32, \d+ threads?\): [\d.]+ ms/iter, [\d,]+ tokens/s, MFU [\d.]+% "
        r"\(peak: measured fp32 matmul\)\n",
        r.stdout,
    ), r.stdout
