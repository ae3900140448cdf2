"""The batched hop under Ray (``server`` serves the per-model ``deployments`` layout by default, and
the combined layout in ``make test``'s second pass): requests batch across callers, every item is
computed once, a deadline that passes in the queue answers 504 without computing its item, a queue
past its bound answers 503 with Retry-After, and a bad image fails alone inside a burst.

``slow-hop`` (tests/specs/slow-hop.yaml) takes 0.3 s per batch of up to 4 and writes how many
items each forward computed, so the tests can count from outside the server.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from tests.test_http_api import png

MODEL = "slow-hop"


def image(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def computed(server) -> int:
    """Items slow-hop has computed so far (its count file lies in the session's generated folder)."""
    path = next(iter(server.repository.parent.glob("generated*/slow-hop-counts.txt")), None)
    return 0 if path is None else sum(int(line) for line in path.read_text().split())


async def burst(server, bodies: list[bytes], headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(
            client.post(f"{server.http_url}/v1/models/{MODEL}/classify", content=body,
                        headers={"Content-Type": "image/png", **(headers or {})}) for body in bodies))


def settle(server, expected: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while computed(server) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # anything computed after the answers would show now
    return computed(server)


def test_requests_batch_and_each_item_computes_once(server):
    server.need(MODEL)
    before = computed(server)
    answers = asyncio.run(burst(server, [image(i) for i in range(8)]))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert max(int(a.headers["X-Batch-Size"]) for a in answers) > 1
    lone = [httpx.post(f"{server.http_url}/v1/models/{MODEL}/classify", content=image(i),
                       headers={"Content-Type": "image/png"}, timeout=60).json() for i in (0, 5)]
    for batched, alone in zip([answers[0].json(), answers[5].json()], lone):  # batching does not change an answer
        assert [p["index"] for p in batched["predictions"]] == [p["index"] for p in alone["predictions"]]
        # (but for float rounding: a batched matmul may sum in another order than a batch of one)
        assert [p["score"] for p in batched["predictions"]] == pytest.approx([p["score"] for p in alone["predictions"]],
                                                                            abs=1e-6)
    assert settle(server, before + 10) == before + 10


def test_a_deadline_that_passes_in_the_queue_is_504_and_never_computed(server):
    server.need(MODEL)
    before = computed(server)

    async def scenario():
        busy = asyncio.ensure_future(burst(server, [image(i) for i in range(6)]))  # two batches of 0.3 s
        await asyncio.sleep(0.1)
        late = await burst(server, [image(99)], headers={"X-Request-Timeout": "0.2"})
        return await busy, late[0]

    busy, late = asyncio.run(scenario())
    assert [a.status_code for a in busy] == [200] * 6
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert settle(server, before + 6) == before + 6


def test_past_the_queue_bound_answers_503_with_retry_after(server):
    server.need(MODEL)
    answers = asyncio.run(burst(server, [image(i) for i in range(40)]))
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 503], statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.json()["error"]["code"] == "overloaded" and int(a.headers["Retry-After"]) >= 1 for a in refused)


def test_a_bad_image_fails_alone_inside_a_burst(server):
    server.need(MODEL)
    bodies = [image(i) for i in range(6)]
    bodies[3] = b"\x89PNG\r\n\x1a\n broken"
    answers = asyncio.run(burst(server, bodies))
    assert [a.status_code for i, a in enumerate(answers) if i != 3] == [200] * 5
    assert answers[3].status_code in (415, 422) and answers[3].json()["error"]["code"] in (
        "unsupported_media_type", "unprocessable_image")
