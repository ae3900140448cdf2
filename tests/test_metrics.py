"""Metrics, request ids and request logs: a known mix of requests, then exact counts.

On the session's Ray Serve server the metrics leave through Ray's metrics export
(``server.metrics_url``, names prefixed ``ray_``) some seconds after the traffic. Other test files
send traffic to the same models, so the module fixture first waits until the export stops changing,
sends its own mix through the typed HTTP API, typed gRPC and the Open Inference Protocol, waits until
the export has caught up, and every test compares deltas. In-process (``hybridserve serve --no-ray``)
the same kind of mix is counted at ``/metrics`` on the HTTP port at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import http.server
import importlib.util
import json
import shutil
import subprocess
import struct
import threading
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from hybridserve_client._grpc.hybridserve.oip.v2 import open_inference_pb2 as oip_pb
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve_client._grpc.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from hybridserve.server.core.errors import ERROR_TABLE
from hybridserve.server.observability.families import FAMILIES, UNKNOWN_MODEL
from hybridserve.server.observability.metrics import ray_metrics_targets
from tests.conftest import PSNR_SPEC, LocalServer, write_generated_weights, write_spec

RAY_PREFIX = "ray_"
SETTLE_S = 12.0  # longer than Ray's metrics report interval (10 s)
EXPORT_WAIT_S = 60.0
CLASSIFIER = "timm-convnext"  # 64x64 center crop: 4096 model-input pixels per image
PICTURE = (48, 64)  # height, width of the test pictures
# Model-input pixels per image: the classifier's 64x64 center crop; psnr sees the picture itself.
PIXELS_PER_ITEM = {CLASSIFIER: 64 * 64, "psnr": PICTURE[0] * PICTURE[1]}
BURST = 24
RESTORERS = ("denoiser", "super-resolution-x2", "craft-x4")


def picture(size: tuple[int, int] = PICTURE, seed: int = 0) -> bytes:
    """A PNG with smooth structure and some noise: height, width."""
    rows, cols = np.mgrid[0:size[0], 0:size[1]]
    base = np.stack([rows * 255 / size[0], cols * 255 / size[1], (rows + cols) * 127 / sum(size)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    buffer = io.BytesIO()
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


Key = tuple[str, frozenset]


class Scrape:
    """The ``hybridserve_*`` samples of one scrape, names without Ray's prefix."""

    def __init__(self, text: str, prefix: str):
        wanted = "\n".join(line for line in text.splitlines() if f"{prefix}hybridserve_" in line)
        self.samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(wanted + "\n"):
            for sample in family.samples:
                key = (sample.name.removeprefix(prefix), frozenset(sample.labels.items()))
                self.samples[key] = self.samples.get(key, 0.0) + sample.value

    def total(self, name: str, **labels: str) -> float:
        return sum(value for (sample, have), value in self.samples.items()
                   if sample == name and set(labels.items()) <= have)

    def labels_of(self, name: str, **labels: str) -> list[dict[str, str]]:
        return [dict(have) for (sample, have) in self.samples if sample == name and set(labels.items()) <= have]

    def counters(self) -> dict[Key, float]:
        return {key: value for key, value in self.samples.items() if key[0].endswith(("_total", "_count"))}


def scrape(url: str, prefix: str = RAY_PREFIX) -> Scrape:
    return Scrape(httpx.get(url, timeout=30).raise_for_status().text, prefix)


def settled(url: str) -> Scrape:
    """A scrape whose counters stopped changing: what earlier tests sent has all been exported."""
    deadline = time.monotonic() + 3 * EXPORT_WAIT_S
    last = scrape(url)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = scrape(url)
        if now.counters() != last.counters():
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            return now
    raise AssertionError("Ray's metrics export never settled")


@dataclass
class Mix:
    """What the module sent, and so what the server must have counted."""

    requests: Tally = field(default_factory=Tally)  # (model, api, outcome, status class)
    bytes_in: Tally = field(default_factory=Tally)  # (model, api)
    bytes_out: Tally = field(default_factory=Tally)  # (model, api)
    finished: Tally = field(default_factory=Tally)  # model -> data-plane requests answered (1 item each)
    request_ids: list[tuple[str, str | None]] = field(default_factory=list)  # (sent, returned)

    def http(self, model: str, api: str, response: httpx.Response, items: int = 1) -> httpx.Response:
        ok = response.status_code == 200
        outcome = "ok" if ok else response.json()["error"]["code"]
        self.requests[(model, api, outcome, f"{response.status_code // 100}xx")] += 1
        self.bytes_in[(model, api)] += int(response.request.headers.get("content-length", 0))
        if ok:
            self.bytes_out[(model, api)] += len(response.content)
            self.finished[model] += items
        return response

    def grpc_call(self, model: str, call, message, api: str = "grpc") -> None:
        """One gRPC call, counted by its status and trailing error code."""
        sent = uuid.uuid4().hex
        self.bytes_in[(model, api)] += message.ByteSize()
        try:
            response, state = call.with_call(message, metadata=[("x-request-id", sent)], timeout=120)
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata())
            code = trailers["hybridserve-error-code"]
            self.requests[(model, api, code, f"{ERROR_TABLE[code].http_status // 100}xx")] += 1
        else:
            trailers = dict(state.trailing_metadata())
            self.requests[(model, api, "ok", "2xx")] += 1
            self.bytes_out[(model, api)] += response.ByteSize()
            self.finished[model] += 1
        self.request_ids.append((sent, trailers.get("x-request-id")))


def task_models(server) -> dict[str, tuple[str, str]]:
    """One served model per task the session has: task -> (model, verb)."""
    chosen = {"classification": (CLASSIFIER, "classify"), "iqa": ("psnr", "assess")}
    if server.has("detector"):
        chosen["detection"] = ("detector", "detect")
    restorer = next((name for name in RESTORERS if server.has(name)), None)
    if restorer:
        chosen["restoration"] = (restorer, "restore")
    return chosen


def send_mix(server, mix: Mix) -> None:
    image, png = picture(), {"Content-Type": "image/png"}
    with httpx.Client(base_url=server.http_url, timeout=300) as http:
        for task, (model, verb) in task_models(server).items():
            for seed in range(3 if task in ("classification", "iqa") else 1):
                shot = picture(seed=seed)
                if task == "iqa":
                    response = http.post(f"/v1/models/{model}/{verb}", files={"image": shot, "reference": image})
                else:
                    response = http.post(f"/v1/models/{model}/{verb}", content=shot, headers=png)
                assert mix.http(model, "http", response).status_code == 200, response.text
        assert mix.http(CLASSIFIER, "http", http.post(f"/v1/models/{CLASSIFIER}/classify", content=b"not an image",
                                                      headers=png)).status_code >= 400
        assert mix.http(CLASSIFIER, "http", http.post(f"/v1/models/{CLASSIFIER}/classify", content=image[:40],
                                                      headers=png)).status_code >= 400
        bad_option = http.post(f"/v1/models/{CLASSIFIER}/classify", content=image, headers=png, params={"top_k": 0})
        assert mix.http(CLASSIFIER, "http", bad_option).json()["error"]["code"] == "invalid_input"
        wrong_task = http.post(f"/v1/models/{CLASSIFIER}/detect", content=image, headers=png)
        assert mix.http(CLASSIFIER, "http", wrong_task).json()["error"]["code"] == "wrong_task"
        for _ in range(2):
            unknown = http.post("/v1/models/no-such-model/classify", content=image, headers=png)
            assert mix.http(UNKNOWN_MODEL, "http", unknown).status_code == 404
        oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(picture(seed=s)).decode() for s in (5, 6)]}]}
        assert mix.http(CLASSIFIER, "oip", http.post(f"/v2/models/{CLASSIFIER}/infer", json=oip), items=2).is_success

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=300) as http:
            return await asyncio.gather(*(http.post(f"/v1/models/{CLASSIFIER}/classify", content=image, headers=png)
                                          for _ in range(BURST)))

    for response in asyncio.run(burst()):
        assert mix.http(CLASSIFIER, "http", response).status_code == 200

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = v1_grpc.HybridServeStub(channel)
        mix.grpc_call(CLASSIFIER, stub.Classify, v1.ClassifyRequest(model=CLASSIFIER, image=image))
        mix.grpc_call(CLASSIFIER, stub.Classify, v1.ClassifyRequest(model=CLASSIFIER, image=b"garbage"))
        mix.grpc_call(UNKNOWN_MODEL, stub.Classify, v1.ClassifyRequest(model="no-such-model", image=image))
        mix.grpc_call("psnr", stub.Assess, v1.AssessRequest(model="psnr", image=image, reference=image))
        tensor = oip_pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
        raw = [struct.pack("<I", len(image)) + image]  # a BYTES element: its length, then its bytes
        oip_infer = GRPCInferenceServiceStub(channel).ModelInfer
        mix.grpc_call(CLASSIFIER, oip_infer, oip_pb.ModelInferRequest(model_name=CLASSIFIER, inputs=[tensor],
                                                                      raw_input_contents=raw), api="oip")


def expectations(mix: Mix, pixels_per_item: dict[str, int]) -> dict[tuple[str, tuple], float]:
    """Exact deltas the export must show: (sample name, label pairs) -> delta.

    ``pixels_per_item``: models whose requests are one item each, with the pixels of that item."""
    expected: dict[tuple[str, tuple], float] = {}
    for (model, api, outcome, status), count in mix.requests.items():
        key = ("hybridserve_requests_total", (("model", model), ("api", api), ("outcome", outcome), ("status", status)))
        expected[key] = count
        seconds = ("hybridserve_request_duration_seconds_count", (("model", model), ("api", api), ("status", status)))
        expected[seconds] = expected.get(seconds, 0) + count
    for (model, api), size in mix.bytes_in.items():
        expected[("hybridserve_request_bytes_total", (("model", model), ("api", api)))] = size
    for (model, api), size in mix.bytes_out.items():
        expected[("hybridserve_response_bytes_total", (("model", model), ("api", api)))] = size
    for model, pixels in pixels_per_item.items():
        for stage in ("preprocess", "postprocess", "queue_wait"):
            expected[(f"hybridserve_{stage}_seconds_count", (("model", model),))] = mix.finished[model]
        expected[("hybridserve_pixels_processed_total", (("model", model),))] = mix.finished[model] * pixels
    return expected


@dataclass
class Observed:
    before: Scrape
    after: Scrape
    mix: Mix
    expected: dict

    def delta(self, name: str, **labels: str) -> float:
        return self.after.total(name, **labels) - self.before.total(name, **labels)


@pytest.fixture(scope="module")
def observed(server) -> Observed:
    before = settled(server.metrics_url)
    mix = Mix()
    send_mix(server, mix)
    expected = expectations(mix, PIXELS_PER_ITEM)
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        after = scrape(server.metrics_url)
        lagging = {key: want for key, want in expected.items()
                   if after.total(key[0], **dict(key[1])) - before.total(key[0], **dict(key[1])) < want}
        if not lagging or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    time.sleep(2.0)  # anything beyond the expected counts would show up now
    return Observed(before, scrape(server.metrics_url), mix, expected)


def _check(observed: Observed, prefix: str) -> None:
    wrong = {f"{name}{dict(labels)}": (observed.delta(name, **dict(labels)), want)
             for (name, labels), want in observed.expected.items()
             if name.startswith(prefix) and observed.delta(name, **dict(labels)) != want}
    assert not wrong, f"(delta, expected) that differ: {wrong}"


def test_requests_are_counted_exactly_by_model_api_and_outcome(observed):
    _check(observed, "hybridserve_requests_total")
    models = {model for model, *_ in observed.mix.requests}
    counted = sum(observed.delta("hybridserve_requests_total", model=m) for m in models)
    assert counted == sum(observed.mix.requests.values()), "requests counted under labels the mix did not send"
    assert observed.delta("hybridserve_requests_total", model="no-such-model") == 0  # names never become labels


def test_latency_histograms_count_every_request(observed):
    _check(observed, "hybridserve_request_duration_seconds_count")
    for model in (CLASSIFIER, "psnr"):
        assert observed.delta("hybridserve_request_duration_seconds_sum", model=model) > 0


def test_stage_histograms_and_pixels_count_every_finished_item(observed):
    for stage in ("preprocess", "postprocess", "queue_wait"):
        _check(observed, f"hybridserve_{stage}_seconds_count")
    _check(observed, "hybridserve_pixels_processed_total")
    assert observed.delta("hybridserve_compute_seconds_count", model=CLASSIFIER) > 0


def test_bytes_in_and_out_match_what_went_over_the_wire(observed):
    _check(observed, "hybridserve_request_bytes_total")
    _check(observed, "hybridserve_response_bytes_total")


def test_concurrent_load_forms_batches_larger_than_one(observed):
    batches = observed.delta("hybridserve_batch_size_count", model=CLASSIFIER)
    assert batches == observed.delta("hybridserve_batches_total", model=CLASSIFIER)
    assert batches == observed.delta("hybridserve_compute_seconds_count", model=CLASSIFIER)
    single = sum(observed.delta("hybridserve_batch_size_bucket", model=CLASSIFIER, le=le) for le in ("1", "1.0"))
    assert 0 < batches < observed.mix.finished[CLASSIFIER], "every item ran alone"
    assert single < batches, "no batch of more than one item under concurrent load"


def test_model_gauges_show_ready_eager_cpu_replicas(observed, server):
    after = observed.after
    for model in {model for model, _ in task_models(server).values()}:
        deployment = f"model-{model}"
        assert after.labels_of("hybridserve_model_ready", model=model, deployment=deployment), model
        assert after.total("hybridserve_model_ready", model=model) >= 1
        assert after.total("hybridserve_model_state", model=model, state="ready") >= 1
        assert after.total("hybridserve_model_state", model=model, state="failed") == 0
        assert after.total("hybridserve_model_load_seconds", model=model) > 0
        info = after.labels_of("hybridserve_model_info", model=model)
        assert {(i["backend"], i["device"], i["application"]) for i in info} == {("eager", "cpu", "hybridserve")}
        assert after.total("hybridserve_queued_items", model=model) == 0
    assert after.total("hybridserve_requests_in_flight") == 0
    gateway = after.labels_of("hybridserve_requests_total", model=CLASSIFIER, api="http")
    assert {labels["deployment"] for labels in gateway} == {"Gateway"}


def test_every_family_is_exported_and_ray_serve_keeps_its_own(observed, server):
    text = httpx.get(server.metrics_url, timeout=30).text
    cpu_only = {"hybridserve_gpu_memory_allocated_bytes", "hybridserve_gpu_memory_reserved_bytes",
                "hybridserve_model_latency_objective_seconds"}  # no CUDA here; no test spec sets an objective
    missing = [f.exported for f in FAMILIES if f.name not in cpu_only and f"{RAY_PREFIX}{f.exported}" not in text]
    assert not missing, f"families absent from Ray's export: {missing}"
    for serve_own in ("ray_serve_num_http_requests_total", "ray_serve_deployment_processing_latency_ms_bucket"):
        assert serve_own in text


def test_grpc_request_id_comes_back_in_trailing_metadata(observed):
    assert observed.mix.request_ids and all(sent == returned for sent, returned in observed.mix.request_ids)


def test_http_request_id_is_taken_from_the_request_and_returned(server):
    given = uuid.uuid4().hex
    response = httpx.post(f"{server.http_url}/v1/models/{CLASSIFIER}/classify", content=picture(),
                          headers={"Content-Type": "image/png", "X-Request-ID": given}, timeout=120)
    assert response.status_code == 200 and response.headers["x-request-id"] == given
    failed = httpx.post(f"{server.http_url}/v1/models/no-such-model/classify", content=b"x",
                        headers={"X-Request-ID": given}, timeout=120)
    assert failed.status_code == 404 and failed.headers["x-request-id"] == given


def test_under_ray_the_metrics_leave_through_rays_export_of_each_node(server):
    response = httpx.get(f"{server.http_url}/metrics", timeout=30)
    assert response.status_code == 404 and "Ray's metrics export" in response.json()["error"]["message"]
    (target,) = ray_metrics_targets()  # what `hybridserve serve` prints: one node here
    assert target.endswith(server.metrics_url.rsplit(":", 1)[1]) and "ray_hybridserve_" in httpx.get(target).text


# ------------------------------------------------------------------ in-process: /metrics on the HTTP port


@dataclass
class InProcess:
    server: LocalServer
    log_lines: list[str]
    observed: Observed
    spans: list  # what the server exported to the OTLP collector below


class OTLPCollector(http.server.ThreadingHTTPServer):
    """A loopback OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self):
        self.spans: list = []
        collector = self

        class Receive(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                body = self.rfile.read(int(self.headers["Content-Length"]))
                exported = ExportTraceServiceRequest.FromString(body)
                collector.spans.extend(span for resource in exported.resource_spans
                                       for scope in resource.scope_spans for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Receive)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> InProcess:
    """``hybridserve serve --no-ray`` with JSON logs: a classifier, psnr and a model that fails to load."""
    weights, repository = tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("in-process")
    write_generated_weights(weights)
    write_spec(repository, CLASSIFIER, task="classification", architecture="timm:convnext_atto",
               architecture_args={"num_classes": 4}, weights=str(weights / "convnext_atto.safetensors"),
               preprocessing={"input_size": [64, 64], "resize": "center_crop"}, labels=["a", "b", "c", "d"],
               batching={"max_batch_size": 8, "max_wait_ms": 20})
    write_spec(repository, "psnr", **PSNR_SPEC)
    write_spec(repository, "broken", task="classification", architecture="timm:convnext_atto",
               weights="missing.safetensors", preprocessing={"input_size": [32, 32]})
    collector = OTLPCollector()
    local = LocalServer(repository, env={"HYBRIDSERVE_LOG_FORMAT": "json", "OTEL_BSP_SCHEDULE_DELAY": "200",
                                         "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}"})
    local.wait_live()
    lines: list[str] = []  # the server's output, line by line as it comes
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in local.process.stdout), daemon=True).start()
    url = f"{local.url}/metrics"
    before, mix = scrape(url, prefix=""), Mix()
    image, png = picture(), {"Content-Type": "image/png"}
    with httpx.Client(base_url=local.url, timeout=120) as http:
        for seed in range(3):
            mix.http("psnr", "http", http.post("/v1/models/psnr/assess", files={"image": picture(seed=seed),
                                                                                "reference": image}))
        mix.http(CLASSIFIER, "http", http.post(f"/v1/models/{CLASSIFIER}/classify", content=b"junk", headers=png))
        mix.http(UNKNOWN_MODEL, "http", http.post("/v1/models/nothing/classify", content=image, headers=png))
        assert mix.http("broken", "http", http.post("/v1/models/broken/classify", content=image,
                                                    headers=png)).status_code == 503

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=local.url, timeout=120) as http:
            return await asyncio.gather(*(http.post(f"/v1/models/{CLASSIFIER}/classify", content=image, headers=png)
                                          for _ in range(16)))

    for response in asyncio.run(burst()):
        assert mix.http(CLASSIFIER, "http", response).status_code == 200
    observed = Observed(before, scrape(url, prefix=""), mix, expectations(mix, PIXELS_PER_ITEM))
    yield InProcess(local, lines, observed, collector.spans)
    local.stop()
    collector.shutdown()


def test_in_process_metrics_count_a_known_mix_exactly(in_process):
    _check(in_process.observed, "hybridserve_")
    observed = in_process.observed
    batches = observed.delta("hybridserve_batch_size_count", model=CLASSIFIER)
    assert observed.delta("hybridserve_batch_size_bucket", model=CLASSIFIER, le="1.0") < batches
    assert observed.delta("hybridserve_batch_size_sum", model=CLASSIFIER) == observed.mix.finished[CLASSIFIER]


def test_in_process_metrics_follow_prometheus_conventions(in_process):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is absent (apt-get install prometheus)")
    text = httpx.get(f"{in_process.server.url}/metrics", timeout=30).text
    linted = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_in_process_model_gauges_tell_ready_from_failed(in_process):
    after = in_process.observed.after
    assert after.total("hybridserve_model_ready", model=CLASSIFIER) == 1
    assert after.total("hybridserve_model_ready", model="broken") == 0
    assert after.total("hybridserve_model_state", model="broken", state="failed") == 1
    assert after.total("hybridserve_model_state", model=CLASSIFIER, state="ready") == 1
    assert after.total("hybridserve_model_state", model=CLASSIFIER, state="warming_up") == 0
    assert after.labels_of("hybridserve_model_info", model=CLASSIFIER, backend="eager", device="cpu",
                           task="classification", architecture="timm:convnext_atto")
    assert after.total("hybridserve_model_warmup_seconds", model=CLASSIFIER) > 0
    assert after.total("hybridserve_model_load_seconds", model=CLASSIFIER) >= \
        after.total("hybridserve_model_warmup_seconds", model=CLASSIFIER)
    assert after.total("hybridserve_requests_in_flight") == 0 and after.total("hybridserve_queued_items") == 0


def test_in_process_request_ids_and_one_json_log_line_per_request(in_process):
    url = f"{in_process.server.url}/v1/models/{CLASSIFIER}/classify"
    given, trace = f"given-{uuid.uuid4().hex}", uuid.uuid4().hex
    image, png = picture(), {"Content-Type": "image/png"}
    answered = httpx.post(url, content=image, headers={**png, "X-Request-ID": given}, timeout=60)
    traced = httpx.post(url, content=b"junk", headers={**png, "traceparent": f"00-{trace}-b7ad6b7169203331-01"},
                        timeout=60)
    anonymous = httpx.post(url, content=image, headers=png, timeout=60)
    assert answered.headers["x-request-id"] == given and traced.headers["x-request-id"] == trace
    generated = anonymous.headers["x-request-id"]
    assert len(generated) == 32 and generated not in (given, trace)

    def request_lines(request_id: str) -> list[dict]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            records = [json.loads(line) for line in in_process.log_lines if request_id in line]
            if records:
                return records
            time.sleep(0.2)
        return []

    (ok,) = request_lines(given)
    assert ok["logger"] == "hybridserve.requests" and ok["level"] == "INFO"
    assert (ok["model"], ok["api"], ok["outcome"], ok["status"]) == (CLASSIFIER, "http", "ok", 200)
    assert ok["batch_size"] >= 1 and ok["items"] == 1 and ok["bytes_in"] == len(image)
    assert all(ok[f"{stage}_ms"] >= 0 for stage in ("queue", "preprocess", "compute", "postprocess"))
    (failed,) = request_lines(trace)
    assert failed["status"] >= 400 and failed["outcome"] != "ok" and failed["error"]
    assert request_lines(generated)
    assert f"Prometheus metrics (docs/metrics.md): {in_process.server.url}/metrics" in in_process.log_lines
    every = [json.loads(line) for line in in_process.log_lines if line.startswith("{")]
    assert every and all("request_id" in record for record in every)
    assert not any(base64.b64encode(image[:24]).decode()[:16] in line for line in in_process.log_lines)


def test_in_process_spans_go_to_the_otlp_endpoint(in_process):
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        pytest.skip("opentelemetry-exporter-otlp-proto-http is absent: tracing is off")
    wanted = {"hybridserve.ingress", "hybridserve.queue", "hybridserve.forward"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not wanted <= {span.name for span in in_process.spans}:
        time.sleep(0.2)
    assert wanted <= {span.name for span in in_process.spans}
    ingress = [{a.key: a.value for a in s.attributes} for s in in_process.spans if s.name == "hybridserve.ingress"]
    assert any(a["model"].string_value == CLASSIFIER and a["http.status_code"].int_value == 200 for a in ingress)
    forward = [span for span in in_process.spans if span.name == "hybridserve.forward"]
    assert all(span.end_time_unix_nano >= span.start_time_unix_nano > 0 for span in forward)
