"""How many CPU threads torch uses: as many as the cores other processes leave free.

torch starts one intra-op thread per core. On an idle machine that is right, even for the toy
networks (``benchmarks/results/threads``); but when another process keeps a core busy, torch's
threads wait for the one that lost its core, and a step takes several times longer (100 times
with two such processes on 2 cores). So a command takes :func:`choose_threads` threads at its
start (:func:`set_threads`), and a fit re-checks the load every minute (:class:`ThreadsForLoad`),
with one line that says so whenever the count changes.

``FLOWMAP_THREADS`` (or ``OMP_NUM_THREADS``) fixes the count; flowmap then leaves it alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

__all__ = [
    "LOAD_WINDOW_S",
    "THREADS_ENV_VARS",
    "ThreadsForLoad",
    "choose_threads",
    "own_load",
    "set_threads",
]

#: Environment variables that fix the thread count; flowmap then leaves it alone.
THREADS_ENV_VARS = ("FLOWMAP_THREADS", "OMP_NUM_THREADS")


def choose_threads(cores: int, busy: float) -> int:
    """The intra-op threads on ``cores`` cores of which other processes keep ``busy`` busy: the
    free cores, at least 1; a core counts as taken from 0.75 of one (this process's own share of
    the load is an estimate, and a neighbour that spins takes a whole core)."""
    return max(1, min(cores, cores - int(busy + 0.25)))


#: the time constant of the 1-minute load average, in seconds
LOAD_WINDOW_S = 60.0


def own_load(previous: float, cpu_s: float, wall_s: float) -> float:
    r"""This process's share of the 1-minute load average after ``wall_s`` seconds in which it
    used ``cpu_s`` CPU seconds: the average's own update
    :math:`\ell \leftarrow \ell\,e^{-\Delta/60} + (c/\Delta)(1 - e^{-\Delta/60})`."""
    decay = math.exp(-wall_s / LOAD_WINDOW_S)
    return previous * decay + cpu_s / max(wall_s, 1e-9) * (1.0 - decay)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: (wall, CPU) seconds of this process when last looked at, and its share of the load then
_own = (time.monotonic(), time.process_time(), 0.0)


def _busy_now() -> float:
    """The cores other processes keep busy now: the 1-minute load average less this process's
    own share (:func:`own_load`, followed since flowmap was imported)."""
    global _own
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    wall, cpu = time.monotonic(), time.process_time()
    mine = own_load(_own[2], cpu - _own[1], wall - _own[0])
    _own = (wall, cpu, mine)
    return max(0.0, load - mine)


def _user_threads() -> int | None:
    """The count the user fixed: ``FLOWMAP_THREADS`` (checked), or torch's own under
    ``OMP_NUM_THREADS``; ``None`` when neither is set."""
    text = os.environ.get("FLOWMAP_THREADS")
    if text:
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(
                f"FLOWMAP_THREADS must be a number of threads (1 or more), got {text!r}."
            )
        return int(text)
    return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else None


def _say(cores: int, busy: float, threads: int, say: Callable[[str], object]) -> None:
    plural = "s" if threads > 1 else ""
    say(
        f"flowmap: other processes load the {cores} cores with {busy:.1f} (1-minute load "
        f"average), so torch uses {threads} thread{plural}; set FLOWMAP_THREADS=N to choose.\n"
    )


def set_threads(say: Callable[[str], object] = sys.stderr.write) -> int:
    """At a command's start: take :func:`choose_threads` threads for the load of the other
    processes, saying so when that is fewer than the cores; returns them."""
    threads = _user_threads()
    if threads is None:
        cores, busy = _cores(), _busy_now()
        threads = choose_threads(cores, busy)
        if threads < cores:
            _say(cores, busy, threads, say)
    torch.set_num_threads(threads)
    return threads


class ThreadsForLoad(L.Callback):
    """During a single-process fit, every ``every_s`` seconds: take :func:`choose_threads` threads
    for the load other processes make now, and say so when the count changes (fewer when other
    work arrives; more once it has gone, which the 1-minute average shows a minute or two late)."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if time.monotonic() - self._last < self.every_s or trainer.world_size > 1:
            return
        self._last = time.monotonic()
        if _user_threads() is not None:
            return
        cores, busy = _cores(), _busy_now()
        threads = choose_threads(cores, busy)
        if threads != torch.get_num_threads():
            _say(cores, busy, threads, sys.stderr.write)
            torch.set_num_threads(threads)
