"""User-caused failures (issue 20) as a catalogue: a full disk, a read-only folder, damaged run files. Each ends with
exit code 2 and one `error: <what> (<fix>)` line, no traceback, no temporary file left, what was there unchanged.

A full or read-only disk is a real tmpfs of its own where mounting is allowed (as root); elsewhere, or with
GPTLAB_TEST_FAKE_DISK=1, writes under it fail in-process with the same errno (`Disk`)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
from conftest import make_text
from safetensors import SafetensorError

from gptlab.cli import main

TEMP = re.compile(r"\.(tmp|old)\b")  # write_atomic's .NAME.tmp-PID, shards' .NAME.tmp, export's .NAME.tmp-PID/.old-PID


def tiny(root: Path) -> list[str]:
    """Overrides of a 2-layer model with a 16-token context, 10 steps, checkpoints at steps 5 and 10."""
    return [
        f"data.source={root / 'corpus.txt'}", f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}",
        "data.workers=1", "model.block_size=16", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "train.batch_size=4", "train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2",
        "train.warmup_iters=2", "train.device=cpu", "train.compile=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with corpus.txt, data/ prepared from it and run/ trained on it, made once for the module."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(make_text())
    assert main(["prepare", *tiny(root), "--quiet"]) == 0
    assert main(["train", *tiny(root), "--quiet"]) == 0
    return root


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) by relative name, with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temps(root: Path) -> list[str]:
    """Temporary files and folders left anywhere under `root`."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if TEMP.search(p.name)]


class Disk:
    """A folder on its own small tmpfs, filled or made read-only for real; where mounting is refused, the same
    failures are raised in-process by the writers gptlab uses (open, mkdir, safetensors)."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path, self.monkeypatch = path, monkeypatch
        path.mkdir()
        fake = os.environ.get("GPTLAB_TEST_FAKE_DISK") == "1"
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]
        self.mounted = not fake and subprocess.run(mount, capture_output=True).returncode == 0

    def fill(self, free_kb: int, fails: Callable[[Path], bool] = lambda p: True) -> None:
        """Leave `free_kb` KiB free; in-process, writes of the files `fails` picks run out of space instead."""
        if not self.mounted:
            return self._fail(errno.ENOSPC, fails)
        filler = self.path / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(bytes(1 << 20))
        os.truncate(filler, max(0, filler.stat().st_size - free_kb * 1024))

    def read_only(self) -> None:
        """No write here from now on."""
        if not self.mounted:
            return self._fail(errno.EROFS, lambda p: True)
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)  # a file still open: detach it anyway

    def _fail(self, code: int, fails: Callable[[Path], bool]) -> None:
        real_open, real_mkdir, real_serialize = io.open, os.mkdir, safetensors.torch.serialize_file

        def hit(file: object) -> bool:
            p = Path(os.path.abspath(file)) if isinstance(file, (str, os.PathLike)) else None
            return p is not None and p.is_relative_to(self.path) and fails(p)

        def failure(file: object) -> OSError:
            if code == errno.ENOSPC:  # as on a full disk: the file is made, then its bytes do not fit
                real_open(file, "wb").close()
                return OSError(code, os.strerror(code))
            return OSError(code, os.strerror(code), str(file))

        def fake_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            if any(c in mode for c in "wax+") and hit(file):
                raise failure(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_mkdir(path: object, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
            if code == errno.EROFS and hit(path):
                raise failure(path)
            real_mkdir(path, mode, dir_fd=dir_fd)

        def fake_serialize(tensors: object, filename: str, metadata: object = None) -> None:
            if hit(filename):
                failure(filename)
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            real_serialize(tensors, filename, metadata)

        self.monkeypatch.setattr(builtins, "open", fake_open)
        self.monkeypatch.setattr(io, "open", fake_open)  # what Path.open calls
        self.monkeypatch.setattr(os, "mkdir", fake_mkdir)
        self.monkeypatch.setattr(safetensors.torch, "serialize_file", fake_serialize)


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    d = Disk(tmp_path / "disk", monkeypatch)
    try:
        yield d
    finally:
        monkeypatch.undo()  # the real writers back before anything is cleaned up
        d.unmount()


def test_disk_is_real_where_mounting_is_allowed(disk):
    """Where root may mount (this machine, CI), the catalogue below runs on a real tmpfs, not the in-process fake."""
    if os.geteuid() == 0 and os.environ.get("GPTLAB_TEST_FAKE_DISK") != "1":
        assert disk.mounted


def check(capsys: pytest.CaptureFixture, argv: list[str], message: str, kept: list[Path], root: Path) -> None:
    """`gptlab ARGV` fails with exit code 2 and exactly `message`; the `kept` files are byte-identical afterwards
    and nothing temporary is left under `root`."""
    before = [snapshot(p) for p in kept]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == message
    assert "Traceback" not in err
    assert [snapshot(p) for p in kept] == before
    assert temps(root) == []


# ----- a full disk, a read-only folder, a folder in the way ---------------------------------------------------------
def train_full(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    run = disk.path / "run"
    shutil.copytree(trained / "run", run)
    started = re.compile(r"\.?(config\.yaml|tokenizer\.json|run\.json|metrics\.jsonl)(\.tmp-\d+)?")
    # room for what a resume writes first, none for the step-15 checkpoint nor (in the cleanup) history.json
    disk.fill(100, lambda p: not started.fullmatch(p.name))
    ckpts = run / "checkpoints"
    message = (
        f"error: could not write checkpoint '{ckpts / 'step_15'}' (OSError: [Errno 28] No space left on device) "
        "(free disk space or fix the folder's permissions; the previous checkpoint is kept)\n"
    )
    kept = [run / "history.json", run / "tokenizer.json", ckpts / "step_5", ckpts / "step_10", ckpts / "latest"]
    return ["train", "--resume", str(run), "train.max_iters=15", "--quiet"], message, [*kept, ckpts / "best"]


def prepare_full(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    shutil.copytree(trained / "data", disk.path / "old")
    disk.fill(24, lambda p: p.name.startswith((".train_", ".val_")))  # meta.json fits, the first shard does not
    new = disk.path / "new"
    message = (
        f"error: cannot write '{new}' (No space left on device) "
        "(free disk space, or write to another disk; the same prepare then resumes)\n"
    )
    return ["prepare", *tiny(trained), f"data.dir={new}", "--quiet"], message, [disk.path / "old"]


def export_full(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    assert main(["export", str(trained / "run"), str(disk.path / "old")]) == 0
    disk.fill(100)  # config.json fits, model.safetensors (143 KB) does not
    message = f"error: cannot write '{disk.path / 'new'}' (No space left on device) (free disk space, or write to another disk)\n"
    return ["export", str(trained / "run"), str(disk.path / "new")], message, [disk.path / "old"]


def export_read_only(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    assert main(["export", str(trained / "run"), str(disk.path / "old")]) == 0
    disk.read_only()
    message = f"error: cannot write '{disk.path / 'new'}' (Read-only file system) (choose a writable folder)\n"
    return ["export", str(trained / "run"), str(disk.path / "new")], message, [disk.path / "old"]


def plot_read_only(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    assert main(["plot", str(trained / "run"), "--out", str(disk.path / "old.png")]) == 0
    disk.read_only()
    message = f"error: cannot write '{disk.path / 'new.png'}' (Read-only file system) (choose a writable folder)\n"
    return ["plot", str(trained / "run"), "--out", str(disk.path / "new.png")], message, [disk.path / "old.png"]


def plot_at_a_folder(trained: Path, tmp: Path, disk: Disk) -> tuple[list[str], str, list[Path]]:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    message = (
        f"error: cannot write '{tmp / 'out'}': it is a folder (give a file name, e.g. '{tmp / 'out' / 'plot.png'}')\n"
    )
    return ["plot", str(trained / "run"), "--out", str(tmp / "out")], message, [tmp / "out"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [train_full, prepare_full, export_full, export_read_only, plot_read_only, plot_at_a_folder]
)
def test_full_disk_and_read_only_outputs(case, trained, tmp_path, disk, capsys):
    argv, message, kept = case(trained, tmp_path, disk)
    check(capsys, argv, message, kept, tmp_path)


# ----- damaged run files ----------------------------------------------------------------------------------------------
GARBLED_YAML = b"model: [n_layer: 2\n"
YAML_FIX = "(restore the run's config.yaml from a backup, or train the run again)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, content, what",
    [
        (["sample", "RUN"], GARBLED_YAML, "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
        (["eval", "RUN"], GARBLED_YAML, "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
        (["serve", "RUN"], GARBLED_YAML, "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
        (["export", "RUN", "OUT"], b"- model\n- train\n", "holds no config mapping"),
        (["train", "--resume", "RUN", "--quiet"], b"model:\n  n_layer: \xff\n", "is not UTF-8 text (byte 18)"),
        (
            ["train", *tiny(Path("ROOT"))[:2], "model.init_from=RUN", "train.out_dir=OUT", "--quiet"],
            GARBLED_YAML,
            "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2",
        ),
    ],  # fmt: skip
    ids=["sample", "eval", "serve", "export", "train-resume", "train-init-from"],
)
def test_damaged_run_config(argv, content, what, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "config.yaml").write_bytes(content)
    paths = {"RUN": str(run), "OUT": str(tmp_path / "out"), "ROOT": str(trained)}
    argv = [re.sub(r"\b(RUN|OUT|ROOT)\b", lambda m: paths[m.group(1)], a) for a in argv]
    check(capsys, argv, f"error: '{run / 'config.yaml'}' {what} {YAML_FIX}\n", [run], tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, content, argv, message",
    [
        (
            "run.json",
            b'{"sessions": [',
            ["train", "--resume", "RUN", "train.max_iters=15", "--quiet"],
            "'RUN/run.json' is damaged (Expecting value: line 1 column 15 (char 14)) "
            "(repair it, or move it away and resume again: it only records the sessions)",
        ),
        (
            "run.json",
            b'{"runs": []}',
            ["train", "--resume", "RUN", "train.max_iters=15", "--quiet"],
            "'RUN/run.json' is damaged (no list of sessions) "
            "(repair it, or move it away and resume again: it only records the sessions)",
        ),
        (
            "metrics.jsonl",
            b'{"step": 1, "loss": 3.5}\n{"step": 2, "lo\xffss": 3.4}\n',
            ["train", "--resume", "RUN", "train.max_iters=15", "--quiet"],
            "'RUN/metrics.jsonl' is not UTF-8 text (byte 40, line 2) (repair or delete that line, then resume again)",
        ),
        (
            "prompt.txt",
            b"ROMEO:\n\xe9\n",
            ["sample", "RUN", "--start", "FILE:RUN/prompt.txt"],
            "prompt file 'RUN/prompt.txt' is not UTF-8 text (byte 7) (convert it to UTF-8)",
        ),
        (
            "checkpoints/latest",
            b"step_\xff10\n",
            ["sample", "RUN", "--checkpoint", "latest"],
            "the pointer file 'RUN/checkpoints/latest' is unreadable (UnicodeDecodeError) (write the name of one of "
            "its checkpoint folders into it, e.g. `echo step_500 > RUN/checkpoints/latest`)",
        ),
        (
            "checkpoints/step_10/meta.json",
            b"[1, 2]",
            ["export", "RUN", "RUN/hf", "--checkpoint", "step_10"],
            "checkpoint 'RUN/checkpoints/step_10' is corrupted: meta.json unreadable (pick an older checkpoint)",
        ),
    ],  # fmt: skip
    ids=[
        "run.json-not-json",
        "run.json-no-sessions",
        "metrics.jsonl-not-utf8",
        "sample-prompt-not-utf8",
        "pointer-not-utf8",
        "meta.json-not-an-object",
    ],
)
def test_damaged_run_files(name, content, argv, message, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / name).write_bytes(content)
    argv = [a.replace("RUN", str(run)) for a in argv]
    check(capsys, argv, f"error: {message.replace('RUN', str(run))}\n", [run], tmp_path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "chat_template.jinja",
            b"{{ messages[0].content }}\xff",
            "'RUN/chat_template.jinja' is not UTF-8 text (invalid start byte at byte 25) (fix or remove the file)",
        ),
        (
            "tokenizer_config.json",
            b'["chat_template"]',
            "'RUN/tokenizer_config.json' is not valid JSON (a JSON list, not an object) (fix or remove the file)",
        ),
    ],  # fmt: skip
)
def test_damaged_chat_template_files(name, content, message, trained, tmp_path):
    """What serve and a fine-tune from the run read beside its tokenizer."""
    from gptlab.chat import load_chat_template
    from gptlab.errors import GptlabError
    from gptlab.tokenizers import Tokenizer

    run = Path(shutil.copytree(trained / "run", tmp_path / "run"))
    (run / name).write_bytes(content)
    with pytest.raises(GptlabError) as e:
        load_chat_template(run, Tokenizer.load(run / "tokenizer.json"))
    assert str(e.value) == message.replace("RUN", str(run))


# ----- small items ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_of_a_run_killed_before_its_first_checkpoint_says_start_again(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / ".tmp-step_5").mkdir(parents=True)  # what a kill during the first write leaves
    message = (
        f"error: run '{run}' has no checkpoint to resume: it stopped before its first one "
        "(start it again with --overwrite)\n"
    )
    # the kill's own leftover stays as it was (in `kept`): the refused resume touches nothing
    check(capsys, ["train", "--resume", str(run), "--quiet"], message, [run], tmp_path / "nothing-else")


def test_plot_without_run_directories_is_one_error_line(capsys):
    assert main(["plot"]) == 2
    assert capsys.readouterr().err == "error: no run directories given (pass one or more train.out_dir folders)\n"
