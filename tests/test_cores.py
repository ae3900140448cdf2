"""Batch threads on cores of their own (server/engine/cores.py): claims across real processes, the
pinned thread, the switch, and a real ``--no-ray`` server whose batch thread runs pinned."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from hybridserve.server.engine import cores
from tests.conftest import PSNR_SPEC, LocalServer, write_spec
from tests.test_faults import png

ALLOWED = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning needs at least 2 allowed CPUs")

# A process that claims ``count`` cores, prints them, and holds them until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    from hybridserve.server.engine.cores import claim_cores
    print(claim_cores(int(sys.argv[1])), flush=True)
    sys.stdin.read()
""")


def holder(folder: Path, count: int = 1) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(count)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, cores.LOCKS_ENV: str(folder)})
    return process, process.stdout.readline().strip()


def release(process: subprocess.Popen) -> None:
    process.stdin.close()
    process.wait(timeout=30)


@needs_two
def test_processes_never_share_a_core_and_an_exit_frees_it(tmp_path):
    held = [holder(tmp_path) for _ in range(len(ALLOWED) - 1)]
    claimed = [claim for _, claim in held]
    # Highest-numbered first, one core each, never twice.
    assert claimed == [str((core,)) for core in reversed(ALLOWED[1:])]
    late, nothing = holder(tmp_path)  # only core 0 is left: claimed by the next process
    assert nothing == str((ALLOWED[0],))
    full, none = holder(tmp_path)  # every core held
    assert none == "None"
    release(full)
    killed = held[0][0]
    killed.kill()  # however a process ends, its cores come free
    killed.wait(timeout=30)
    again, claim = holder(tmp_path)
    assert claim == str((ALLOWED[-1],))
    for process in [again, late] + [p for p, _ in held[1:]]:
        release(process)


@needs_two
def test_the_batch_thread_runs_on_its_claimed_cores(tmp_path, monkeypatch):
    monkeypatch.setenv(cores.LOCKS_ENV, str(tmp_path))
    free = [core for core in reversed(ALLOWED) if core not in cores._held]  # not claimed by this process's models
    if not free:
        pytest.skip("this test process's models hold every core")
    executor, claimed = cores.batch_thread(1)
    try:
        assert claimed == (free[0],)
        assert executor.submit(os.sched_getaffinity, 0).result() == set(claimed)
        assert os.sched_getaffinity(0) == set(ALLOWED), "the calling thread keeps every core"
    finally:
        executor.shutdown()
        cores._release(claimed)


def test_nothing_is_pinned_when_switched_off_or_when_the_model_wants_every_core(tmp_path, monkeypatch):
    monkeypatch.setenv(cores.LOCKS_ENV, str(tmp_path))
    assert cores.claim_cores(len(ALLOWED)) is None
    assert cores.claim_cores(0) is None
    monkeypatch.setenv(cores.PIN_ENV, "0")
    executor, claimed = cores.batch_thread(1)
    try:
        assert claimed is None
        assert executor.submit(os.sched_getaffinity, 0).result() == set(ALLOWED)
    finally:
        executor.shutdown()


def affinities(pid: int) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        out.append(next(line.split(":", 1)[1].strip() for line in status.splitlines()
                        if line.startswith("Cpus_allowed_list")))
    return out


@needs_two
def test_a_no_ray_servers_batch_thread_is_pinned_and_holds_its_claim(tmp_path):
    repo, locks = tmp_path / "repo", tmp_path / "locks"
    repo.mkdir()
    write_spec(repo, "psnr", **PSNR_SPEC)
    server = LocalServer(repo, env={cores.LOCKS_ENV: str(locks)}).wait_ready()
    try:
        image = png()
        answer = httpx.post(f"{server.url}/v1/models/psnr/assess", files={"image": image, "reference": image},
                            timeout=30)
        assert answer.status_code == 200, answer.text  # the batch thread starts with the first batch
        pinned = [a for a in affinities(server.process.pid) if a == str(ALLOWED[-1])]
        assert len(pinned) == 1, affinities(server.process.pid)  # the one model's batch thread
        process, claim = holder(locks)  # the server holds the highest core: the next process gets another
        release(process)
        assert claim == str((ALLOWED[-2],))
    finally:
        server.stop()
