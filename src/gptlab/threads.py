"""Torch's CPU threads: a fixed `--threads N`, or by default a count that drops when other work takes the cores.

GNU OpenMP, which runs torch's CPU ops, ends every parallel region at a barrier where the team waits for its
slowest thread. When other processes take the cores, a thread is descheduled for a whole time slice and the
others wait for it, region after region: on two loaded cores a training step of the default preset went from
tens of milliseconds to up to seconds, while one thread, with no barriers, lost only its share of the CPU
(benchmarks/contention.py). So `ThreadGovernor` runs repeated work (training steps, decode steps, eval batches)
with all threads and watches how much CPU its threads got while it ran: on a quiet machine they run the whole
time (spinning at barriers counts), ~0.99 of threads x wall time; on a loaded one they are descheduled, ~0.5.
Only then does it time a unit with fewer threads (1; and all but one core on bigger machines) and keep the faster
count, and from a lowered count it times the higher one now and then (spaced by the probe's own duration over
`PROBE_BUDGET`) to come back when the load ends. A quiet machine never probes, so it runs every unit with the same
count: its results do not depend on timing (some kernels give other bits at another thread count).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from gptlab.errors import GptlabError

PROBE_BUDGET = 0.03  # the share of the time that probing other thread counts may cost
MARGIN = 0.1  # a count is kept only when it is at least this much faster than the current one
RECENT = 3  # a probe is compared with the median of this many latest units at the current count
LOADED = 0.7  # threads that got less than this share of their wall time on a CPU were descheduled: look for fewer

_requested: int | None = None  # --threads N for this process; None: the governors choose
_local = threading.local()  # per thread (OpenMP settings are per thread): the count a governor found, and set


def check_threads(n: int | None, flag: str = "--threads") -> int | None:
    """`n` when it is a valid thread count (None: choose automatically); a user error otherwise."""
    if n is not None and n < 1:
        raise GptlabError(f"{flag} must be at least 1, got {n}", f"e.g. {flag} 1, or leave it out to let gptlab choose")
    return n


def use(n: int | None, here: bool = True) -> None:
    """This process's policy: `n` torch threads in each thread that does the work, or None to choose by timing.

    `here`: set the count in the calling thread at once too (not where that thread must not start an OpenMP pool:
    `gptlab serve`'s main thread, see serve.py).
    """
    global _requested
    _requested = check_threads(n)
    if n is not None and here:
        _set(n)


def describe() -> int | str:
    """What run.json records: the fixed count, or "auto"."""
    return _requested if _requested is not None else "auto"


def _set(n: int) -> None:
    """Set this thread's torch thread count, remembering what it was before any governor touched it."""
    if getattr(_local, "last_set", None) != torch.get_num_threads():  # first touch, or changed by someone else since
        _local.baseline = torch.get_num_threads()
    torch.set_num_threads(n)
    _local.last_set = n


def available() -> int:
    """The threads this thread may use: torch's count, or what it was before a governor lowered it."""
    now = torch.get_num_threads()
    return getattr(_local, "baseline", now) if getattr(_local, "last_set", None) == now else now


def candidates(most: int) -> list[int]:
    """The counts a governor compares, most first: all threads, all but one (a core left to other work), one."""
    return sorted({most, max(1, most - 1), 1}, reverse=True)


class ThreadGovernor:
    """Sets the torch thread count for each unit of repeated work (`with gov.unit(): ...`) in the thread running it.

    `fixed` pins the count (`--threads N`); otherwise, when `adaptive`, the counts `choices` (default:
    `candidates()` of what the thread has) are compared by timing units (see the module docstring), and when not,
    the count the working thread has is kept. The first unit (compilation, a prompt's prefill) is not timed.
    `clock`, `cpu_clock` (the process's CPU time) and `set_threads`/`get_threads` are replaceable for tests.
    """

    def __init__(
        self,
        fixed: int | None = None,
        *,
        adaptive: bool = True,
        choices: list[int] | None = None,
        budget: float = PROBE_BUDGET,
        margin: float = MARGIN,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        set_threads: Callable[[int], None] = _set,
        get_threads: Callable[[], int] = torch.get_num_threads,
    ) -> None:
        self.fixed = check_threads(fixed, "threads")
        self.adaptive = fixed is None and adaptive
        self.choices = [fixed] if fixed is not None else choices  # None: taken at the first unit, in its thread
        self.budget, self.margin, self.clock, self.cpu_clock = budget, margin, clock, cpu_clock
        self.busy: deque[float] = deque(maxlen=RECENT)  # CPU time / (threads x wall time) of the latest units
        self._set_threads, self._get_threads = set_threads, get_threads
        self.current = self.choices[0] if self.choices else 0
        # durations of the latest units at `current`, by kind: a probe is compared with units of its own kind only
        self.recent: dict[Hashable, deque[float]] = {}
        self.kind: Hashable = None  # the kind of the unit under way; None: not timed
        self.next_probe: dict[int, float] = {}  # clock time from which a count may be probed again
        self.probing: int | None = None
        self.units = 0
        self.switches = 0
        self._t0 = 0.0

    def begin(self, kind: Hashable = 0) -> int:
        """Before a unit of `kind` (units of one kind take the same time; None: not timed): set and return the
        thread count it runs with."""
        if self.choices is None:
            # (not adaptive: the thread's count as it was before another governor lowered it, if one did)
            self.choices = candidates(available()) if self.adaptive else [available()]
            self.current = self.choices[0]
        n = self.current
        self.kind = kind
        if self.units > 0 and len(self.choices) > 1 and kind is not None and self.recent.get(kind):
            now = self.clock()
            # fewer threads only once this count's threads were seen descheduled; more, whenever due
            loaded = len(self.busy) == RECENT and statistics.median(self.busy) < LOADED
            due = [
                c for c in self.choices
                if (c > self.current or (c < self.current and loaded)) and now >= self.next_probe.get(c, 0.0)
            ]  # fmt: skip
            if due:
                self.probing = n = min(due, key=lambda c: self.next_probe.get(c, 0.0))
        if self._get_threads() != n:
            self._set_threads(n)
        self._t0, self._c0 = self.clock(), self.cpu_clock()
        return n

    def end(self) -> None:
        """After a unit: record its duration; after a probe, keep the faster count."""
        now, cpu = self.clock(), self.cpu_clock()
        self.units += 1
        probed, self.probing = self.probing, None
        timed = self.units > 1 and self.kind is not None  # the first unit compiles or warms up: its time says nothing
        if timed and len(self.choices) > 1:
            if probed is None and now > self._t0:
                self.busy.append((cpu - self._c0) / ((now - self._t0) * self.current))
            self._record(now - self._t0, probed, now)
        if self._get_threads() != self.current:  # what runs between units (an evaluation) runs with the choice
            self._set_threads(self.current)

    def _record(self, dt: float, probed: int | None, now: float) -> None:
        if probed is None:
            self.recent.setdefault(self.kind, deque(maxlen=RECENT)).append(dt)
            return
        reference = statistics.median(self.recent[self.kind])
        if dt < reference * (1 - self.margin):  # faster: keep it; the old count is probed again later
            self.next_probe[self.current] = now + reference / self.budget
            self.current, self.recent = probed, {self.kind: deque([dt], maxlen=RECENT)}
            self.busy.clear()
            self.switches += 1
        else:
            self.next_probe[probed] = now + dt / self.budget

    @contextmanager
    def unit(self, kind: Hashable = 0) -> Iterator[int]:
        """One unit of work of `kind` at the governed thread count (a unit that raises is not timed)."""
        n = self.begin(kind)
        try:
            yield n
        except BaseException:
            self.kind, self.probing = None, None  # neither recorded nor taken as a probe's result
            raise
        finally:
            self.end()


def governor(adaptive: bool = True) -> ThreadGovernor:
    """A governor following this process's policy (`use`): the fixed count, else chosen by timing when `adaptive`
    (work on the CPU in one process), else the working thread's own count."""
    return ThreadGovernor(_requested, adaptive=adaptive)
