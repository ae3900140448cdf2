"""Property and fuzz tests: the OpenAPI contract of the running server, and the image decoder.

``make test`` runs a few hundred cases; ``make fuzz`` raises the count through
``HYBRIDSERVE_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import io
import os

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemathesis.specs.openapi.checks import positive_data_acceptance

from hybridserve.server.core.errors import HybridServeError
from hybridserve.server.core.images import decode_image

EXAMPLES = int(os.environ.get("HYBRIDSERVE_FUZZ_EXAMPLES", "30"))


def test_api_contract_holds_for_generated_requests(server):
    """No 5xx and no response outside the documented schema, whatever the request, for every operation."""
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Whether bytes are a decodable image, or tensors fit a model, is beyond what OpenAPI can
            # state: schema-valid requests may rightly get 4xx, so that one check is left out.
            case.call_and_validate(base_url=server.http_url, timeout=60, excluded_checks=[positive_data_acceptance])

        check()


def encoded_samples() -> list[bytes]:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    samples = []
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        samples.append(buffer.getvalue())
    return samples


SAMPLES = encoded_samples()


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position: position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@given(mutated_images(), st.sampled_from(["rgb", "gray"]))
@settings(max_examples=EXAMPLES * 10, deadline=None)
def test_image_decoder_never_crashes_on_mutated_bytes(data, color):
    try:
        array = decode_image(data, color)
    except HybridServeError as exc:
        assert exc.kind.http_status in (413, 415, 422)
    else:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == (1 if color == "gray" else 3)
