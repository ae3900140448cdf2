"""Cores of their own for the models' batch threads.

Ray grants a replica a number of CPUs, not which ones, and the kernel moves a busy thread between
cores as the request path's threads come and go: an eager forward that loses its caches on every
move ran slower. ``batch_thread`` pins each model's batch thread (and the torch threads it starts,
which inherit its mask) to cores claimed for it; the event loop and the pre/postprocess thread
keep the rest. Measured on 2 CPUs, EfficientFormerV2-S0 eager, ``--layout combined``, c=32, the
same server unpinned and pinned, interleaved rounds, three A/Bs: 39.3 -> 44.9, 40.5 -> 46.3 and
41.2 -> 41.0 images/s; the forward's own CPU time per image 23.2 -> 20.8 ms (docs/performance.md).

A claim is an exclusive ``flock`` on one file per core in a folder that every hybridserve process
on the node shares (``HYBRIDSERVE_CORE_LOCKS``; the temporary directory's ``hybridserve-cores`` by
default): two processes never pin to the same core, and a process that exits, however it exits,
frees its cores. Cores go highest-numbered first (core 0 takes most of the interrupts and the
system's own work). Where fewer cores are free than a model's threads, or the process may use no
more cores than that anyway, nothing is pinned. ``HYBRIDSERVE_PIN_CORES=0`` turns pinning off
(nodes shared with other tenants that pin too, without Kubernetes' static CPU manager).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("hybridserve.cores")

PIN_ENV = "HYBRIDSERVE_PIN_CORES"
LOCKS_ENV = "HYBRIDSERVE_CORE_LOCKS"
_held: dict[int, int] = {}  # core -> the open lock file's descriptor, for the life of the process


def pinning_on() -> bool:
    return os.environ.get(PIN_ENV, "1") != "0"


def locks_folder() -> Path:
    return Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / "hybridserve-cores")


def claim_cores(count: int) -> tuple[int, ...] | None:
    """``count`` cores of this process's allowed set that no other claim holds, or None (pin nothing)."""
    allowed = sorted(os.sched_getaffinity(0), reverse=True)
    if not pinning_on() or count < 1 or count >= len(allowed):
        return None
    taken: list[int] = []
    for core in allowed:
        if len(taken) == count:
            break
        if core not in _held and _lock(core):
            taken.append(core)
    if len(taken) < count:
        _release(taken)
        log.info("fewer than %d free cores to pin a batch thread to (claims in %s); it runs unpinned",
                 count, locks_folder())
        return None
    return tuple(sorted(taken))


def _lock(core: int) -> bool:
    """Claim ``core`` for this process: False where another process holds it or the folder is not ours to use."""
    try:
        folder = locks_folder()
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o1777)  # like /tmp: every user's processes claim here (flock needs only read access)
        fd = os.open(folder / f"core-{core}", os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:  # another user's folder or file: pin nothing rather than fail the model
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # another process holds it
        os.close(fd)
        return False
    _held[core] = fd
    return True


def _release(cores: tuple[int, ...] | list[int]) -> None:
    for core in cores:
        fd = _held.pop(core, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


def _pin(cores: tuple[int, ...] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)  # 0: the calling thread


def batch_thread(threads: int = 0) -> tuple[ThreadPoolExecutor, tuple[int, ...] | None]:
    """A model's batch thread, pinned to ``threads`` claimed cores where that many are free (0: unpinned); and those cores."""
    cores = claim_cores(threads)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridserve-batch", initializer=_pin,
                                  initargs=(cores,))
    return executor, cores
