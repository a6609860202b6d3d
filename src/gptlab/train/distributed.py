"""Training on several processes with PyTorch's own engine: torchrun's environment, DDP or FSDP2, collectives.

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; the trainer joins the group
here (NCCL on CUDA, gloo on CPU). Rank r takes rows r::world of every global batch, so the batches, and with
them the losses, do not depend on the number of ranks. `launch` is `gptlab train --nproc N`: torchrun's own
launcher, run in-process so that a failing rank ends in one clear error line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptlab.errors import GptlabError

LAUNCH_COMMAND = "GPTLAB_LAUNCH_COMMAND"  # the launcher's command line (JSON), for run.json to record in each rank
# the parts of the backends' messages that mean a peer is gone rather than a bug in this process
LOST_PEER = ("connection", "closed", "reset by peer", "timed out", "timeout", "broken pipe", "nccl", "gloo")


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks; every collective is a no-op on a single rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates tasks and writes the run directory's files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (decisions that must agree: metrics, the best checkpoint)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


SINGLE = Dist()


def env_world() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device, bool]:
    """Join torchrun's process group (when there is one): (this rank, its device, whether this call created it).

    On CUDA each rank takes the device of its local rank. `timeout_s` bounds how long a collective waits
    for a rank that died or hangs before it fails.
    """
    if env_world() == 1 and not dist.is_initialized():
        return SINGLE, device, False
    created = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GptlabError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}",
                f"start at most {torch.cuda.device_count()} ranks per machine (--nproc_per_node)",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise GptlabError(f"distributed training runs on CUDA or CPU, not {device.type}", "use train.device=cpu")
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        except (RuntimeError, ValueError) as e:
            raise GptlabError(
                f"could not join the other ranks: {e}", "start the run with `torchrun` or `gptlab train --nproc N`"
            ) from e
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device, created


def shutdown(clean: bool) -> None:
    """Leave the group. After a clean run every rank waits for the others first: without that barrier gloo
    was seen to abort at exit here, while a peer still used its connection."""
    if not dist.is_initialized():
        return
    if clean:
        with contextlib.suppress(RuntimeError):  # a peer that left already: nothing more to wait for
            dist.barrier()
    dist.destroy_process_group()


def lost_peer(e: BaseException) -> bool:
    """Whether a collective's error means another rank died or hung (rather than a bug here)."""
    return isinstance(e, dist.DistError) or any(word in str(e).lower() for word in LOST_PEER)


class LostRanks(GptlabError):
    """A collective failed because another rank is gone: a consequence, not a cause, so its own exit code lets the
    launcher name the rank that failed first."""

    exit_code = 3


def peer_error(e: BaseException, timeout_s: float) -> LostRanks:
    """The error a rank reports when a collective fails because another rank is gone."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # without gloo's source location and advice
    return LostRanks(
        f"lost contact with the other ranks ({first}): another rank died, or hung longer than "
        f"train.dist_timeout={timeout_s:g} s",
        "see the first failing rank's output above, then continue with --resume from the last checkpoint",
    )


# ----- wrapping the model -------------------------------------------------------------------------
def check_parallel(parallel: str, optimizer: str, dtype: torch.dtype) -> None:
    """Settings FSDP2 cannot honour here are user errors naming the setting."""
    if parallel != "fsdp":
        return
    if optimizer == "muon":  # Newton-Schulz orthogonalises whole matrices; FSDP holds row shards
        raise GptlabError(
            "train.optimizer=muon does not work with train.parallel=fsdp (Muon needs whole matrices)",
            "use train.optimizer=adamw, or train.parallel=ddp",
        )
    if dtype == torch.float16:
        raise GptlabError(
            "train.dtype=float16 does not work with train.parallel=fsdp (its loss scaler is DDP's)",
            "use train.dtype=bfloat16 or float32",
        )


def wrap(model: nn.Module, parallel: str, d: Dist, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module the training step calls: `model` itself on one rank, a DDP wrapper, or `model` sharded in
    place by FSDP2 (each block, then the rest), computing in `dtype` and reducing gradients in fp32."""
    if d.world == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; older versions know only that name
        warnings.simplefilter("ignore", FutureWarning)
        # the only buffers (RoPE's tables) are the same constants on every rank: no broadcast before each forward
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded by FSDP2 (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps: only the last one of a step syncs."""
    if sync:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on CPU; gathered from the shards under FSDP (a collective: every rank
    calls it, rank 0 receives the tensors, the others an empty dict)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (every rank holds it) into `model`, sharding it under FSDP."""
    if not is_sharded(model):
        model.load_state_dict(tensors, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


# ----- the launcher ------------------------------------------------------------------------------
def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m gptlab <argv>` on `nproc` local ranks through torchrun's launcher; returns the exit code.

    A rank that fails with a user error has printed it already (exit 2); a rank that died otherwise (a
    signal, a crash) is named here. When one rank fails torchrun stops the others.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    saved_env = dict(os.environ)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 with a warning; share the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    os.environ[LAUNCH_COMMAND] = json.dumps(sys.argv)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )  # fmt: skip
    # torchrun's agent logs each failure and signal with a traceback; the lines below say it once
    agent_logs = [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))
    ]  # fmt: skip
    levels = [log.level for log in agent_logs]
    for log in agent_logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elastic_launch(config, sys.executable)("-m", "gptlab", *argv)
        return 0
    except SignalException as e:  # Ctrl-C or SIGTERM: torchrun passed it on, each rank saved a checkpoint
        print("interrupted", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return _report(e.failures)
    finally:
        for log, level in zip(agent_logs, levels):
            log.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)


def _report(failures: dict[int, Any]) -> int:
    """The launcher's exit code for failed ranks, naming the one that caused it.

    When one rank fails torchrun stops the others (SIGTERM, then SIGKILL after its timeout), and a rank that
    loses its peers exits with LostRanks.exit_code: consequences. A user error (2) was printed by its rank already.
    """
    causes = {rank: f for rank, f in failures.items() if f.exitcode not in (LostRanks.exit_code, -signal.SIGTERM)}
    if any(f.exitcode == 2 for f in causes.values()):
        return 2  # a rank blocked in a collective meanwhile may have been killed by torchrun: not a cause
    stopped = {128 + signal.SIGINT, 128 + signal.SIGTERM}  # a rank was signalled, not the launcher
    if causes and all(f.exitcode in stopped for f in causes.values()):
        return max(f.exitcode for f in causes.values())  # the ranks agreed on a step; rank 0 said where it stopped
    rank, first = min((causes or failures).items(), key=lambda item: (item[1].timestamp, item[0]))
    sys.stderr.write(f"error: rank {rank} {_ended(first.exitcode)} and the run stopped (see its output above; "
                     "continue with gptlab train --resume RUN_DIR --nproc N from the last checkpoint)\n")  # fmt: skip
    return 1


def _ended(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
