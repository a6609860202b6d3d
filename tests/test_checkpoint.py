import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from gptlab.errors import GptlabError
from gptlab.train import checkpoint as ckpt
from gptlab.train.trainer import Trainer

FULL_DISK = {  # how each writer reports a full disk
    "save_file": SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
    "save": RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    "os": OSError("disk full"),
}


@pytest.mark.parametrize("failure", ["os", "save_file", "save"])
def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(prepared, monkeypatch, failure):
    from dataclasses import replace

    Trainer(replace(prepared, train=replace(prepared.train, max_iters=10)), quiet=True).fit()
    root = Path(prepared.train.out_dir) / "checkpoints"
    assert ckpt.read_pointer(root / "latest") == "step_10"

    def crash(*args, **kwargs):  # the training state is already written when the weights' (or state's) write dies
        raise FULL_DISK[failure]

    monkeypatch.setattr(*((ckpt.torch, "save") if failure == "save" else (ckpt, "save_file")), crash)
    longer = replace(prepared, train=replace(prepared.train, max_iters=20))
    with pytest.raises(GptlabError) as e:
        Trainer(longer, resume=True, quiet=True).fit()
    cause = f"{type(FULL_DISK[failure]).__name__}: {FULL_DISK[failure]}"
    assert str(e.value) == (
        f"could not write checkpoint '{root / 'step_15'}' ({cause}) (free disk space or fix the folder's "
        "permissions; the previous checkpoint is kept)"
    )
    monkeypatch.undo()
    assert ckpt.read_pointer(root / "latest") == "step_10"
    assert not (root / "step_15").exists() and not list(root.glob(".*tmp*"))  # the half-built folder is gone
    cfg, model, tok = ckpt.load_run(prepared.train.out_dir, "latest")
    resumed = Trainer(longer, resume=True, quiet=True)
    assert resumed.step == 10
    resumed.fit()
    assert resumed.step == 20 and not list(root.glob(".tmp-*"))


def test_corrupted_and_truncated_checkpoints_are_user_errors(prepared):
    Trainer(prepared, quiet=True).fit()
    step = Path(prepared.train.out_dir) / "checkpoints" / "step_20"
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GptlabError) as e:
        ckpt.load_run(prepared.train.out_dir, "latest")
    assert str(e.value).startswith(f"checkpoint '{step}' is corrupted: model.safetensors unreadable (")
    assert str(e.value).endswith("(pick an older checkpoint)")

    state = step / "state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(GptlabError) as e:
        ckpt.load_state(step)
    assert str(e.value) == f"checkpoint '{step}' is corrupted: state.pt unreadable (pick an older checkpoint)"

    (step / "meta.json").write_text('{"format_version": 99, "step": 20}')
    with pytest.raises(GptlabError) as e:
        ckpt.read_meta(step)
    assert str(e.value) == (
        f"checkpoint '{step}' has format version 99, expected 2 (use the gptlab version that wrote it)"
    )


def test_weights_of_another_shape_are_refused(prepared):
    Trainer(prepared, quiet=True).fit()
    path = ckpt.find_checkpoint(prepared.train.out_dir, "latest")
    from dataclasses import replace

    from gptlab.model import GPT

    other = GPT(replace(prepared.model, n_embd=64, vocab_size=30))
    with pytest.raises(GptlabError) as e:
        ckpt.load_model_tensors(other, ckpt.load_weights(path), str(path))
    assert str(e.value).startswith(f"checkpoint '{path}' does not match the model config: shape of ")


def test_state_holds_only_weights_only_safe_types(prepared):
    Trainer(prepared, quiet=True).fit()
    path = ckpt.find_checkpoint(prepared.train.out_dir, "latest")
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 20 and len(state["rng"]) == 1  # one RNG state per rank
    ckpt.set_rng_state(state["rng"][0])  # restores without error
    assert (path / "train_state" / ".metadata").is_file()  # the model and optimizer state, by parameter name


def test_a_stop_before_the_first_step_saves_nothing(prepared, capsys):
    """A checkpoint at step 0 would hold an optimizer state torch.distributed.checkpoint had to invent (a zero step)."""
    trainer = Trainer(prepared, quiet=True)
    trainer._stop_requested = True  # Ctrl-C while the run was starting
    trainer.fit()
    assert trainer.step == 0 and not (Path(prepared.train.out_dir) / "checkpoints").exists()
    assert "interrupted before the first step: nothing to save" in capsys.readouterr().err


def test_a_kill_while_pruning_leaves_no_torn_step_folder(prepared, monkeypatch):
    from dataclasses import replace

    Trainer(replace(prepared, train=replace(prepared.train, keep_last=5)), quiet=True).fit()
    root = Path(prepared.train.out_dir) / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_15", "step_20", "step_5"]
    real_rmtree = ckpt.shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file, then the process dies
        if not Path(path).exists():
            return
        next(Path(path).rglob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(root, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    # the torn folder is hidden under a trash name; every step_N left is whole and loads
    assert (root / ".trash-step_5").is_dir() and not (root / "step_5").exists()
    for name in ("step_10", "step_15", "step_20"):
        assert ckpt.load_weights(root / name)
    ckpt.prune_checkpoints(root, keep_last=2)  # the next pruning finishes the job
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_15", "step_20"]


def test_a_resume_after_a_kill_before_latest_moved_writes_its_own_later_checkpoints(prepared):
    """Killed after step_10 was renamed into place but before `latest` named it; resumed with a longer budget (so
    another learning-rate schedule): the run's step_10 must be the resumed trajectory's, not the killed one's."""
    from dataclasses import replace

    from safetensors.torch import load_file

    short = replace(prepared, train=replace(prepared.train, max_iters=10, keep_last=10))
    Trainer(short, quiet=True).fit()
    run = Path(prepared.train.out_dir)
    root = run / "checkpoints"
    killed = load_file(root / "step_10" / "model.safetensors")
    ckpt.write_pointer(root / "latest", "step_5")
    ckpt.write_pointer(root / "best", "step_5")
    clean = shutil.copytree(run, run.parent / "clean")  # the same, without the step_10 the kill left
    shutil.rmtree(clean / "checkpoints" / "step_10")

    for out in (run, clean):
        Trainer(
            replace(short, train=replace(short.train, max_iters=20, out_dir=str(out))), resume=True, quiet=True
        ).fit()
    resumed = load_file(root / "step_10" / "model.safetensors")
    expected = load_file(clean / "checkpoints" / "step_10" / "model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)  # the resumed trajectory, bit for bit
    assert not all(torch.equal(resumed[k], killed[k]) for k in killed)  # not the killed run's schedule
