"""moe-report: the report built from hand-made counts, the three sources (file, live URL, prompts through the
default model), the files it writes, and one-line failures on bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from routing.stats import RoutingStats
from serve.launch.report import build_report, main, read_prompts

REPO = Path(__file__).resolve().parents[2]


def _stats() -> RoutingStats:
    """2 layers x 4 experts, K=2: layer 0 skewed [6, 2, 0, 0] x 10, layer 1 even [2, 2, 2, 2] x 10."""
    stats = RoutingStats(2, 4, window=4, layer_names=["model.layers.0.mlp", "model.layers.1.mlp"], model="hand")
    stats.top_k, stats.expert_bytes = 2, 1024
    for _ in range(10):
        stats.record(0, torch.tensor([[0, 0], [0, 0], [0, 0], [1, 1]]))
        stats.record(1, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
        stats.step()
    return stats


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        return image.size


def test_report_of_hand_counts():
    report = build_report(_stats(), ep_sizes=[2], redundant=2)
    assert (report["routed"], report["tokens"], report["num_experts"]) == (160, 40, 4)
    layer0, layer1 = report["layers"]
    assert (layer0["max_over_mean"], layer0["hottest"], layer0["dead"]) == (3.0, [0, 1], [2, 3])
    assert (layer1["max_over_mean"], layer1["cv"], layer1["normalized_entropy"]) == (1.0, 0.0, 1.0)
    linear = next(r for r in report["ep"] if r["placement"] == "linear")
    assert linear["loads"] == [80.0 + 40, 0.0 + 40] and linear["straggler"] == 0
    assert linear["layer_balancedness"] == [0.5, 1.0]
    assert linear["step_balancedness"] == pytest.approx((40 + 40) / (80 + 40))
    (advice,) = report["eplb"]
    assert advice["predicted_step_balancedness"] > advice["baseline_step_balancedness"]
    assert advice["replica_bytes"] == 1024 * 2 * 2 and advice["replica_bytes_per_rank"] == 2048
    window = build_report(_stats(), counts="window", ep_sizes=[2], redundant=2)
    assert window["routed"] == 160 * 4 // 10  # the last 4 of 10 steps
    json.dumps(report)  # machine-readable as it is


def test_stats_file_to_json_table_and_figures(tmp_path, capsys):
    _stats().save(tmp_path / "stats.json")
    out = tmp_path / "out"
    assert main(["--stats", str(tmp_path / "stats.json"), "--out", str(out), "--ep-sizes", "2,4"]) == 0
    printed = capsys.readouterr().out
    assert "Routing load per layer" in printed and "EPLB recommendation" in printed
    report = json.loads((out / "report.json").read_text())
    assert [row["ep_size"] for row in report["eplb"]] == [2, 4]
    assert report["counts_LE"] == [[60, 20, 0, 0], [20, 20, 20, 20]]
    width, height = _png_size(out / "heatmap.png")
    assert width >= 500 and height >= 250
    assert _png_size(out / "ranks.png")[0] >= 500
    assert not (out / "routing_stats.json").exists()  # the source was a file already


@pytest.fixture
def fake_server():
    """A stdlib HTTP server answering GET /v1/moe/routing with a stats dict (the real server serves to_dict())."""
    payload = json.dumps(_stats().to_dict()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/v1/moe/routing"
            body = payload if ok else b'{"error": {"message": "routing statistics are off"}}'
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_live_server_url(fake_server, tmp_path):
    out = tmp_path / "out"
    assert main(["--url", fake_server + "/v1/", "--out", str(out), "--ep-sizes", "2", "--redundant", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "hand" and report["routed"] == 160
    assert RoutingStats.load(out / "routing_stats.json").to_dict() == _stats().to_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("moe-report: error: ")
    return err


@pytest.mark.parametrize("args, message", [
    (["--stats", "{missing}"], "cannot read routing statistics"),
    (["--stats", "{garbage}"], "cannot read routing statistics"),
    (["--stats", "{mismatched}"], r"cumulative has shape \(1, 4\), expected \(2, 4\)"),
    (["--stats", "{good}", "--ep-sizes", "3", "--redundant", "1"], "EP size 3 does not fit 4 experts"),
    (["--stats", "{good}", "--ep-sizes", "4", "--redundant", "2"], r"num_experts \+ num_redundant \(6\)"),
    (["--url", "http://127.0.0.1:{port}"], "cannot reach http://127.0.0.1:"),
    (["--url", "{server}/other"], "answered HTTP 404: routing statistics are off"),
    (["--prompts", "{bad_prompts}"], "line 2: expected a JSON object"),
])
def test_bad_input_is_one_line_and_exit_1(args, message, tmp_path, capsys, fake_server):
    good = tmp_path / "good.json"
    _stats().save(good)
    mismatched = json.loads(good.read_text())
    mismatched["cumulative"] = mismatched["cumulative"][:1]
    (tmp_path / "mismatched.json").write_text(json.dumps(mismatched))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"}\n{"neither": 1}\n')
    paths = {"missing": tmp_path / "none.json", "garbage": tmp_path / "garbage.json", "good": good,
             "mismatched": tmp_path / "mismatched.json", "port": _free_port(), "server": fake_server,
             "bad_prompts": tmp_path / "bad.jsonl"}
    argv = [a.format(**paths) for a in args] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert re.search(message, _error_line(capsys))


def test_read_prompts_accepts_prompt_and_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b"}\n\n{"text": "c", "id": 3}\n')
    assert read_prompts(path) == ["a b", "c"]


def test_prompts_end_to_end_with_the_default_model_and_wandb(tmp_path):
    """`python -m serve.launch.report --prompts` (what the `moe-report` script runs) on the embedded default model."""
    prompts = ["The quick brown fox", "Mixture of experts", "Once upon a time there was"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run([sys.executable, "-m", "serve.launch.report", "--prompts", str(path), "--max-tokens", "4",
                             "--out", str(out), "--wandb"], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "Per EP rank" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["num_layers"], report["num_experts"], report["top_k"]) == (
        "moe-serve-default", 4, 8, 2)
    from serve.engine.config import DEFAULT_MODEL
    from serve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(DEFAULT_MODEL))
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
    # every prompt token and every fed-back output token goes through every layer (at most max_tokens - 1 each)
    assert prompt_tokens <= report["tokens"] <= prompt_tokens + 3 * len(prompts)
    assert all(sum(row) == report["tokens"] * 2 for row in report["counts_LE"])
    assert [row["ep_size"] for row in report["eplb"]] == [2, 4, 8]
    stats = RoutingStats.load(out / "routing_stats.json")
    assert stats.steps > 0 and stats.expert_bytes == 3 * 128 * 128 * 4  # fp32 SwiGLU, D = F = 128
    import matplotlib.image

    heatmap = matplotlib.image.imread(out / "heatmap.png")
    assert heatmap.ndim == 3 and heatmap.shape[0] >= 250 and heatmap.shape[1] >= 500
    assert _png_size(out / "ranks.png")[0] >= 500
    run_dir = Path(report["files"]["wandb_run_dir"])
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("run-*.wandb")) and list((run_dir / "files" / "media" / "images").rglob("*.png"))
