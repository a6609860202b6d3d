"""Experiment tracking: git provenance in run.json, TensorBoard and W&B sinks, samples during training, profiling.

metrics.jsonl (callbacks.MetricsLogger) is always written; everything here is switched on by `train.*` settings.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import gptlab
from gptlab import threads
from gptlab.config import Config, SampleConfig
from gptlab.data.shards import write_atomic
from gptlab.errors import GptlabError
from gptlab.generate import prompt_text
from gptlab.progress import console
from gptlab.train.callbacks import Callback
from gptlab.train.distributed import LAUNCH_COMMAND

if TYPE_CHECKING:
    from gptlab.data.batches import PreparedData
    from gptlab.tokenizers import Tokenizer
    from gptlab.train.trainer import Trainer

TRACK_FIX = "pip install 'gptlab[track]'"
SHOWN_FILES = 3  # changed files named in the dirty-tree refusal
RECORDED_FILES = 100  # changed files listed in run.json


# ----- git provenance -------------------------------------------------------------------------
@dataclass(frozen=True)
class GitState:
    """The commit of a repository and its tracked files with uncommitted changes."""

    root: str
    commit: str | None  # None before the first commit
    dirty_files: tuple[str, ...]

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_files)

    def describe(self) -> str:
        """`<short sha>`, with `(dirty: N files)` when tracked files changed."""
        head = self.commit[:7] if self.commit else "no commit yet"
        n = len(self.dirty_files)
        return f"{head} (dirty: {n} file{'s' if n != 1 else ''})" if n else head

    def record(self) -> dict[str, Any]:
        """What run.json keeps: root, commit, dirty flag and (up to 100 of) the changed files."""
        return {
            "root": self.root, "commit": self.commit, "dirty": self.dirty,
            "dirty_files": list(self.dirty_files[:RECORDED_FILES]), "dirty_count": len(self.dirty_files),
        }  # fmt: skip


def _git(args: list[str], cwd: str | Path | None) -> str | None:
    """stdout of a git command, or None when it fails or git is not installed."""
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except OSError:
        return None
    return r.stdout.decode("utf-8", "replace") if r.returncode == 0 else None


def git_state(cwd: str | Path | None = None) -> GitState | None:
    """Commit and changed tracked files of the repository holding `cwd` (default: the current directory).

    Untracked files do not count (a new notes file or a run directory is not a change to the code).
    None outside a repository or without git.
    """
    root = _git(["rev-parse", "--show-toplevel"], cwd)
    if root is None:
        return None
    commit = _git(["rev-parse", "--verify", "--quiet", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "-z", "--untracked-files=no"], cwd)
    if status is None:
        return None
    files, entries = [], iter(status.split("\0"))
    for entry in entries:  # "XY path", and a rename's or copy's old path as the next entry
        if entry:
            files.append(entry[3:])
            if entry[0] in "RC":
                next(entries, None)
    return GitState(root.strip(), commit.strip() if commit else None, tuple(files))


def check_git(require_clean: bool, cwd: str | Path | None = None) -> GitState | None:
    """The git state of the current directory; a dirty tree is refused when `require_clean` (story 2's guard)."""
    state = git_state(cwd)
    if require_clean and state is not None and state.dirty:
        n, shown = len(state.dirty_files), ", ".join(state.dirty_files[:SHOWN_FILES])
        more = f" and {n - SHOWN_FILES} more" if n > SHOWN_FILES else ""
        raise GptlabError(
            f"train.require_clean_git: the git repository '{state.root}' has uncommitted changes to {n} tracked "
            f"file{'s' if n != 1 else ''}: {shown}{more}",
            "commit or stash them, or pass --allow-dirty",
        )
    return state


def read_sessions(path: Path) -> list[Any]:
    """The sessions a run.json lists ([] when there is none); a damaged file is an error naming it."""
    if not path.is_file():
        return []
    fix = "repair it, or move it away and resume again: it only records the sessions"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise GptlabError(f"'{path}' is damaged ({str(e).splitlines()[0]})", fix) from e
    sessions = data.get("sessions") if isinstance(data, dict) else None
    if not isinstance(sessions, list):
        raise GptlabError(f"'{path}' is damaged (no list of sessions)", fix)
    return sessions


def start_session(
    run_dir: Path,
    git: GitState | None,
    device: torch.device,
    step: int,
    quiet: bool = False,
    ranks: int = 1,
    parallel: str = "none",
    extra: dict[str, Any] | None = None,
) -> dict:
    """Append this session (git, versions, command line, device and ranks, start time, and `extra`'s fields, which
    win) to RUN_DIR/run.json; print the git line."""
    launched = os.environ.get(LAUNCH_COMMAND)  # `gptlab train --nproc N`: the command the user typed
    session = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": step,
        "command": json.loads(launched) if launched else sys.argv,
        "cwd": str(Path.cwd()),
        "git": git.record() if git else None,
        "gptlab": gptlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "ranks": ranks,
        "parallel": parallel,
        "threads": threads.describe(),  # --threads N, or "auto" (chosen by timing the steps: gptlab/threads.py)
        **(extra or {}),
    }
    path = run_dir / "run.json"
    sessions = read_sessions(path)  # a resume adds to the first
    write_atomic(path, json.dumps({"sessions": [*sessions, session]}, indent=2).encode())
    if not quiet:
        console.print(f"git: {git.describe() if git else 'none'}", markup=False, highlight=False)
    return session


# ----- set-up checks --------------------------------------------------------------------------
def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GptlabError(what, TRACK_FIX) from e


def check_tracking(cfg: Config, data: PreparedData) -> None:
    """Fail before anything is written when a sink's package is missing or the sample prompt is unusable."""
    t = cfg.train
    if t.tensorboard:
        _require("torch.utils.tensorboard", "train.tensorboard needs the tensorboard package")
    if t.wandb != "off":
        _require("wandb", "train.wandb needs the wandb package")
    if not t.sample_interval:
        return
    prompt = prompt_text(cfg.sample.start)
    try:
        ids = data.tokenizer().encode(prompt, allow_special=cfg.sample.allow_special)
    except GptlabError as e:  # e.g. a character the data's vocabulary lacks
        raise GptlabError(f"sample.start: {e.what}", "set sample.start to text the data's tokenizer has") from e
    if not ids:
        raise GptlabError("sample.start is empty", "give sample.start some text, or set train.sample_interval=0")


def callbacks(trainer: Trainer) -> list[Callback]:
    """The tracking callbacks `train.*` asks for, in the order they should run."""
    t = trainer.cfg.train
    found: list[Callback] = []
    if t.sample_interval:
        found.append(Sampler(t.sample_interval, trainer.cfg.sample, quiet=trainer.quiet))
    if t.tensorboard:
        found.append(TensorBoardLogger())
    if t.wandb != "off":
        found.append(WandbLogger(t.wandb, t.wandb_project))
    if t.profile:
        found.append(Profiler(quiet=trainer.quiet))
    return found


# ----- samples during training ----------------------------------------------------------------
def sample_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, s: SampleConfig) -> str:
    """One continuation of `prompt` with the sample.* settings, leaving the model in training mode and the
    torch RNG where it was (so a run with samples trains exactly as one without)."""
    from gptlab.generate import Generator, SamplingParams

    params = SamplingParams(s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.seed)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        try:
            ids = tokenizer.encode(prompt, allow_special=s.allow_special)
            return Generator(model, tokenizer).complete(ids, s.max_new_tokens, params, stop=s.stop, truncate=True)
        finally:
            model.train()


class Sampler(Callback):
    """Every `interval` steps: one sample from sample.start, sent as the `on_sample` event and printed."""

    all_ranks = True  # under FSDP the weights are gathered from every rank's shards first

    def __init__(self, interval: int, s: SampleConfig, quiet: bool = False) -> None:
        self.interval, self.s, self.quiet = interval, s, quiet

    def on_train_start(self, trainer: Trainer) -> None:
        self.tokenizer = trainer.data.tokenizer()
        self.prompt = prompt_text(self.s.start)

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if step % self.interval:
            return
        with trainer.averaged():  # train.ema: the weights the run would save now
            model = trainer.inference_model()
            text = None if model is None else sample_text(model, self.tokenizer, self.prompt, self.s)
        if text is None:  # not rank 0
            return
        if not self.quiet:
            console.print(f"[bold]sample at step {step}:[/]")
            console.print(self.prompt + text, markup=False, highlight=False)
        trainer.fire("on_sample", {"step": step, "sample": text})


# ----- TensorBoard and Weights & Biases -------------------------------------------------------
def numeric(metrics: dict[str, Any], skip: tuple[str, ...] = ("step", "epoch")) -> dict[str, float]:
    """The numbers of an event's metrics (later evaluations add keys such as val_exact_match)."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: float(v) for k, v in numbers.items() if k not in skip}


class _Sink(Callback):
    """Sends each step's, epoch's and evaluation's numbers and each sample to `scalars` and `text`."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def text(self, text: str, step: int) -> None: ...

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.scalars({f"train/{k}": v for k, v in numeric(metrics).items()}, metrics["step"])

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.scalars({"epoch/train_loss": metrics["train_loss"]}, metrics["step"])

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.scalars({f"eval/{k}": v for k, v in numeric(metrics).items()}, metrics["step"])

    def on_sample(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.text(record["sample"], record["step"])


class TensorBoardLogger(_Sink):
    """Event files in RUN_DIR/tensorboard; a resumed run continues them, hiding steps the checkpoint lost."""

    def __init__(self) -> None:
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what an earlier session logged from this step on (lost after a crash)
        purge = trainer.step + 1 if trainer.step else None
        self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"), purge_step=purge)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, text: str, step: int) -> None:
        # indented four spaces, markdown shows it verbatim (newlines and all)
        self.writer.add_text("sample", "".join("    " + line for line in text.splitlines(keepends=True)), step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(_Sink):
    """A W&B run (offline: files in RUN_DIR/wandb, no network) whose id is kept there, so a resume continues it."""

    def __init__(self, mode: str, project: str) -> None:
        self.mode, self.project = mode, project
        self.run = None
        self.samples: list[list[Any]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        wandb = _require("wandb", "train.wandb needs the wandb package")
        id_file = trainer.run_dir / "wandb" / "run_id.txt"
        if not id_file.is_file():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(id_file, secrets.token_hex(4).encode())  # W&B's own ids are 8 lowercase letters/digits
        config = {**asdict(trainer.cfg), "git": trainer.git.record() if trainer.git else None}
        # silent: no banner; console off: W&B leaves stdout to the progress bar; our run.json already has git
        settings = wandb.Settings(silent=True, console="off", disable_git=True)
        # W&B advertises its LLM tracer when it sees e.g. openai imported; a training run has no LLM calls to trace
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        try:
            self.run = wandb.init(
                project=self.project, dir=str(trainer.run_dir), mode=self.mode, config=config,
                id=id_file.read_text().strip(), name=trainer.run_dir.name, resume="allow", settings=settings,
            )  # fmt: skip
        except Exception as e:  # W&B's errors (login, network) are many types; none is gptlab's bug
            raise GptlabError(
                f"W&B could not start ({type(e).__name__}: {e})",
                "run `wandb login`, or set train.wandb=offline and `wandb sync RUN_DIR/wandb/offline-run-*` later",
            ) from e
        # online, a resumed W&B run knows its last step; steps before it are refused (with a warning) by W&B
        self.first_step = self.run.step if trainer.step else 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def text(self, text: str, step: int) -> None:
        import wandb

        self.samples.append([step, text])  # W&B shows a table as logged last: keep every row of this session
        if step >= self.first_step:
            self.run.log({"samples": wandb.Table(columns=["step", "sample"], data=self.samples)}, step=step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.run is not None:
            self.run.finish()


# ----- profiling ------------------------------------------------------------------------------
class Profiler(Callback):
    """Traces a few steps with the torch profiler (after warm-up) into RUN_DIR/profile and prints where time goes.

    The trainer labels each step's regions "data" (waiting for the batch) and "step" (forward, backward, optimizer).
    """

    WAIT, WARMUP, ACTIVE = 1, 1, 3  # steps skipped, run with the profiler on but not kept, recorded

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.prof: torch.profiler.profile | None = None
        self.done = False

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer, self.cuda = trainer, trainer.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=self.WAIT, warmup=self.WARMUP, active=self.ACTIVE, repeat=1)
        self.prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._ready)
        self.prof.start()

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.prof is None:
            return
        self.prof.step()  # the end of a step: _ready runs here after the last recorded one
        if self.done:  # the rest of the run trains unprofiled
            self.prof.stop()
            self.prof = None

    def _ready(self, prof: torch.profiler.profile) -> None:
        self.done = True
        last = self.trainer.step
        first = last - self.ACTIVE + 1
        folder = self.trainer.run_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"trace_steps_{first}-{last}.json"  # chrome://tracing, ui.perfetto.dev
        prof.export_chrome_trace(str(trace))
        summary = profile_summary(prof, self.ACTIVE, self.cuda)
        (folder / f"summary_steps_{first}-{last}.txt").write_text(summary + "\n")
        if not self.quiet:
            text = f"profile of steps {first}-{last} (trace: {trace})\n{summary}"
            console.print(text, markup=False, highlight=False, soft_wrap=True)  # unwrapped: the table is wide

    def on_train_end(self, trainer: Trainer) -> None:
        if self.prof is not None:
            self.prof.stop()
            if not self.done and not self.quiet:
                console.print(f"[yellow]train.profile: the run ended before the {self.WAIT + self.WARMUP + self.ACTIVE}"
                              " steps the profiler needs; no trace written[/]")  # fmt: skip


def profile_summary(prof: torch.profiler.profile, steps: int, cuda: bool = False) -> str:
    """The top operations by self time, and each step's time split into waiting for data, computing and the rest."""
    from torch.autograd.profiler_util import EventList

    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    ops = EventList([e for e in events if not e.key.startswith("ProfilerStep")])  # the whole step: its self time is
    table = ops.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15)  # the rest

    def ms(key: str) -> float:  # a labelled region's wall time per step on the training thread
        return by_key[key].cpu_time_total / 1000 / steps if key in by_key else 0.0

    # on CUDA "step" ends with the loss's sync, so it holds the GPU's time too
    data, compute, total = ms("data"), ms("step"), max(ms("ProfilerStep*"), 1e-9)
    other = max(total - data - compute, 0.0)
    shares = (
        f"per step {total:.2f} ms: waiting for data {data:.2f} ms ({100 * data / total:.0f}%), "
        f"computing {compute:.2f} ms ({100 * compute / total:.0f}%), "
        f"other {other:.2f} ms ({100 * other / total:.0f}%: logging, samples, evaluation between steps)"
    )
    return f"{table}\n{shares}"
