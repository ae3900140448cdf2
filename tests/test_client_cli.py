"""The ``hybridserve-client`` command on the session's real server (one-off calls and ``bench``),
and the complete example of docs/client.md, run as written."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridserve_client.cli import main
from tests.conftest import needs_eval


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    image = Image.open(needs_eval("sr", "Set5", "HR", "baby.png")).convert("RGB").resize((48, 40))
    image.save(path)
    return path


def test_classify_prints_ranked_labels(server, photo_path, capsys):
    assert main(["classify", server.http_url, "timm-convnext", str(photo_path), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(photo_path)) and "(timm-convnext)" in lines[0]
    scores = [float(line.split()[0]) for line in lines[1:]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


def test_restore_writes_the_image(server, photo_path, tmp_path, capsys):
    server.need("craft-x4")
    out = tmp_path / "big.png"
    assert main(["restore", server.http_url, "craft-x4", str(photo_path), "-o", str(out)]) == 0
    assert Image.open(out).size == (48 * 4, 40 * 4)
    assert "192x160 png" in capsys.readouterr().out


def test_detect_draws_boxes(server, tmp_path, capsys):
    server.need("detector")
    from hybridserve.models.training.scenes import held_out_scenes

    scene = tmp_path / "scene.png"
    Image.fromarray(held_out_scenes(1)[0].image).save(scene)
    out = tmp_path / "boxes.png"
    assert main(["detect", server.http_url, "detector", str(scene), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "detector" and Image.open(out).size == Image.open(scene).size


def test_assess_with_reference(server, capsys):
    server.need("ssim")
    dist, ref = needs_eval("iqa", "dist", "I04.bmp"), needs_eval("iqa", "ref", "I04.bmp")
    assert main(["assess", server.http_url, "ssim", str(dist), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "(ssim)" in out and "full-reference" in out and "higher is better" in out
    assert -1.0 <= float(out.split(": ")[1].split()[0]) <= 1.0


def test_segment_prints_the_classes_and_writes_the_mask(server, tmp_path, capsys):
    server.need("segmenter")
    from hybridserve.models.training.segscenes import held_out_segmentation_scenes

    scene = held_out_segmentation_scenes(1)[0]
    path, out = tmp_path / "scene.png", tmp_path / "mask.png"
    Image.fromarray(scene.scene.image).save(path)
    assert main(["segment", server.http_url, "segmenter", str(path), "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}  (segmenter, 128x128):"
    assert lines[1].split()[1] == "background", "most pixels first"
    mask = np.asarray(Image.open(out))
    assert mask.shape == (128, 128) and (mask == scene.class_map).mean() >= 0.95
    assert main(["segment", server.http_url, "segmenter", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "mask" not in result and result["labels"] == ["background", "circle", "square", "triangle"]


def test_models_and_health(server, capsys):
    assert main(["models", server.http_url]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == set(server.specs)
    assert main(["health", server.http_url]) == 0
    assert "ready: True" in capsys.readouterr().out


def test_server_errors_exit_1_with_the_reason(server, photo_path, capsys):
    assert main(["classify", server.http_url, "no-such-model", str(photo_path)]) == 1
    assert "ModelNotFound" in capsys.readouterr().err


def test_entry_point_is_installed():
    result = subprocess.run([sys.executable, "-m", "hybridserve_client.cli", "--help"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert "bench" in result.stdout and "classify" in result.stdout


@pytest.mark.parametrize("engine", ["aiohttp", "threads", "httpx"])
def test_bench_concurrency_levels(server, tmp_path, engine, capsys):
    report, table = tmp_path / "bench.json", tmp_path / "bench.csv"
    code = main(["bench", server.http_url, "timm-convnext", "--concurrency", "1,4", "--duration", "1.5",
                 "--warmup", "0.5", "--engine", engine, "--json", str(report), "--csv", str(table)])
    assert code == 0
    levels = json.loads(report.read_text())["levels"]
    assert [level["level"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] > 0 and level["errors"] == 0
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"]
        assert 0 < level["client_cpu"] and level["client_cpu_ms_per_request"] > 0
    rows = list(csv.DictReader(table.open()))
    assert [float(row["level"]) for row in rows] == [1.0, 4.0]
    printed = capsys.readouterr().out
    assert f"engine {engine}" in printed and "p99 ms" in printed


def test_bench_request_rate_over_grpc_and_http(server, tmp_path):
    from hybridserve.server.cli.main import grpc_servicers

    urls = [server.http_url] + ([f"grpc://{server.grpc_target}"] if grpc_servicers() else [])
    for url in urls:
        report = tmp_path / "rate.json"
        assert main(["bench", url, "timm-convnext", "--rate", "20", "--duration", "1.5", "--warmup", "0.5",
                     "--json", str(report), "--no-progress"]) == 0
        level = json.loads(report.read_text())["levels"][0]
        assert level["mode"] == "rate" and level["errors"] == 0
        assert 20 <= level["requests"] <= 40, level  # 1.5 s at 20/s, counted by start time


def test_bench_generated_images_are_distinct_pictures():
    from hybridserve_client.bench import generated_images

    images = [np.asarray(Image.open(io.BytesIO(i.data))) for i in generated_images((32, 48), count=3)]
    assert all(image.shape == (32, 48, 3) for image in images)
    assert not np.array_equal(images[0], images[1]) and images[0].std() > 10


def test_docs_example_runs_as_written(server, tmp_path):
    """The complete example of docs/client.md, with only its URL pointed at the session's server."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "client.md"
    example = docs.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    for model in ("classifier", "psnr", "detector", "super-resolution-x2", "segmenter"):
        server.need(model)
    assert 'URL = "http://localhost:8000"' in example
    script = tmp_path / "example.py"
    script.write_text(example.replace('URL = "http://localhost:8000"', f'URL = "{server.http_url}"'))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ready: True" in run.stdout and "digit: 7" in run.stdout and "error: model_not_found 404" in run.stdout
    assert (tmp_path / "detections.png").exists() and Image.open(tmp_path / "restored.png").size == (256, 192)
    assert "segments: ['" in run.stdout and "mask (96, 128)" in run.stdout


def test_readme_example_runs_as_written(server, tmp_path):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Python client", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    server.need("classifier")
    server.need("psnr")
    script = tmp_path / "readme.py"
    script.write_text(example.replace('"http://localhost:8000"', f'"{server.http_url}"'))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    top1, psnr_line = run.stdout.splitlines()
    assert top1.startswith("label='7'") and psnr_line.endswith(" dB") and 20 < float(psnr_line.split()[0]) < 40
