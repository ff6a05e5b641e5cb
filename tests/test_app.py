"""The Gradio app: the Blocks build without launching, and `python app.py` driven end to end by gradio_client."""

import json
import os
from collections import Counter
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EVENTS = {"init", "load_model", "generate", "redraw_heatmap", "load_trace", "analyse", "explain", "explain_gate"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, ADAPTIVE_MODEL=str(model_dir), ADAPTIVE_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within 90 s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-app-model"))
    port = free_port()
    proc = launch(model_dir, port, tmp_path_factory.mktemp("logs") / "app.log")
    yield f"http://127.0.0.1:{port}/", str(model_dir)
    proc.terminate()
    proc.wait(timeout=20)


def test_blocks_build_without_launching():
    import app

    demo = app.build_app()
    deps = demo.get_config_file()["dependencies"]
    named = {d["api_name"] for d in deps if d.get("api_visibility") == "public"}
    assert EVENTS <= named
    assert not demo.is_running


def test_model_info_names_per_layer_thresholds():
    import app
    from adaptive import Runtime

    from conftest import make_model

    rt = Runtime.from_model(make_model("llama"))
    rt.defaults = {"early_exit": {"threshold": 0.9, "exit_layers": [1, 2], "threshold_offsets": {"2": -0.2}}}
    info = app.model_info(rt)
    assert "threshold 0.9" in info and "exit after 2 layers at threshold 0.7 (offset -0.2)" in info
    assert "plain logit lens" not in info  # this model has no adapters to leave out


def test_model_info_says_when_the_default_exits_skip_the_adapters():
    import app
    from adaptive import Runtime
    from adaptive.exits import ExitHeads

    from conftest import make_model

    rt = Runtime.from_model(make_model("llama"))
    d = rt.spec.hidden_size
    rt.heads = ExitHeads(rt.model, {1: (torch.zeros(d, d), torch.zeros(d))})
    rt.heads.source = "adapters (test)"
    assert "plain logit lens" not in app.model_info(rt)
    rt.defaults = {"early_exit": {"exit_adapters": False}}
    assert "exit heads: adapters (test) (the default exits read the plain logit lens)" in app.model_info(rt)


def test_missing_bundled_model_is_reported_not_fatal(tmp_path, monkeypatch):
    import gradio as gr

    import adaptive.runtime
    import app

    monkeypatch.setattr(adaptive.runtime, "DEFAULT_MODEL_DIR", tmp_path / "pycoder-8l")
    monkeypatch.delenv("ADAPTIVE_MODEL", raising=False)
    assert "bundled model is not in" in app.startup_message()
    assert "bundled model is not in" in app.on_page_load()[0]  # banner first, knobs left as they are
    app.build_app()  # the page still builds
    with pytest.raises(gr.Error, match="bundled default model is missing"):
        app.load_model(app.BUNDLED)


def generate(client, model, prompt="def main():\n", mode="early_exit", threshold=0.3, max_new_tokens=24, **kw):
    args = dict(model=model, prompt=prompt, mode=mode, threshold=threshold, measure="max_prob",
                kv_policy="propagate", exit_layers="", max_new_tokens=max_new_tokens, temperature=0.0, seed=None,
                heat_value="confidence measure", drafter="self", draft_model="", draft_depth=0, draft_length=0,
                max_draft=8, draft_vocab_size=None)
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def test_generate_explain_download_upload(server, tmp_path):
    from gradio_client import Client, handle_file

    from adaptive import GenerationResult

    url, model = server
    client = Client(url, verbose=False)
    status, tokens, text, heatmap, ledger, ledger_plot, audit, stats, pick, trace_file, spec, *_ = generate(client, model)
    n = stats["new_tokens"]
    assert stats["mode"] == "early_exit" and stats["num_layers"] == 4 and 1 <= n <= 24
    assert tokens.count('class="air-tok"') == n and "top-5 at final layer 4" in tokens  # the lens ran
    plot = json.loads(heatmap["plot"])
    heat = plot["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 4 and len(heat["z"][0]) == n
    assert "Measured speedup vs full depth" in ledger  # the full-depth run of the same prompt ran
    assert "full depth" in audit
    assert "No speculative rounds" in spec  # the panel says so for an early-exit run
    result = GenerationResult.from_json(Path(trace_file).read_text())
    assert result.token_ids and len(result.traces) == n and result.text == text

    fig, summary = client.predict(token_index=0, layer=0, n_steps=8, model=model, threshold=0.3, measure="max_prob",
                                  api_name="/explain")
    bars = json.loads(fig["plot"])["data"]
    assert len(bars[0]["y"]) == len(result.prompt_ids)  # one IG value per context token
    assert "convergence delta" in summary

    # Upload the downloaded trace: every view redraws from the file alone.
    outputs = client.predict(file=handle_file(trace_file), heat_value="confidence measure", api_name="/load_trace")
    assert outputs[1].count('class="air-tok"') == n and "needs the lens" in outputs[1]
    assert "Analyse with model" in outputs[0]
    analysed = client.predict(model=model, heat_value="KL to final layer", api_name="/analyse")
    assert "top-5 at final layer" in analysed[1] and "Measured speedup" in analysed[4]
    kl = json.loads(client.predict(heat_value="KL to final layer", api_name="/redraw_heatmap")["plot"])
    assert "KL to final" in kl["layout"]["title"]["text"]


def test_speculative_panel(server):
    """mode="speculative" with a fixed depth and length (deterministic drafts on the tiny model): the panel is
    drawn from the run's rounds, agrees with the runtime's stats, the output equals full depth (greedy is
    lossless), and an uploaded trace redraws the panel without the model."""
    from gradio_client import Client, handle_file

    from adaptive import GenerationResult

    url, model = server
    client = Client(url, verbose=False)
    (status, tokens, text, heatmap, ledger, ledger_plot, audit, stats, pick, trace_file, spec_tokens, spec_plot,
     spec_rounds, *_) = generate(client, model, prompt="import os\n", mode="speculative", draft_depth=2, draft_length=4)
    assert stats["mode"] == "speculative" and (stats["draft_depth"], stats["draft_length"]) == (2, 4)
    result = GenerationResult.from_json(Path(trace_file).read_text())
    n, passes = len(result.traces), stats["verifier_passes"]
    assert n == stats["new_tokens"] > 4 and len(result.rounds) == passes
    sources = Counter(t.source for t in result.traces)
    assert sources["draft"] > 0 and sources["correction"] > 0  # this prompt has both kinds on the tiny model
    assert spec_tokens.count('data-source="draft"') == sources["draft"]
    assert spec_tokens.count('data-source="correction"') == sources["correction"]
    assert spec_tokens.count('data-source="rejected"') == sources["correction"]  # one struck draft per correction
    assert spec_rounds.count("<tr>") == passes + 1
    data = {d["name"]: d for d in json.loads(spec_plot["plot"])["data"]}
    assert data["acceptance by position"]["y"] == pytest.approx(stats["acceptance_by_position"])
    assert len(data["rejected draft"]["x"]) == sum(1 for r in result.rounds if r.accepted < len(r.drafted))
    assert "| tokens per verifier pass |" in ledger and "Measured speedup vs full depth" in ledger
    assert "tokens equal the full-depth run" in audit  # greedy speculation equals full depth
    assert tokens.count('class="air-tok"') == n and "exit after layer 4 of 4" in tokens

    outputs = client.predict(file=handle_file(trace_file), heat_value="confidence measure", api_name="/load_trace")
    assert outputs[10].count('data-source="rejected"') == sources["correction"]
    uploaded = {d["name"]: d for d in json.loads(outputs[11]["plot"])["data"]}
    assert uploaded["acceptance by position"]["y"] == data["acceptance by position"]["y"]
    assert outputs[12].count("<tr>") == passes + 1


def test_auto_mode_panel(server):
    """mode="auto": the scheduler's plan, reason, candidates and audit are drawn; bad scheduler knobs and a
    model without a prompt gate are reported on the page."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, model = server
    client = Client(url, verbose=False)
    outs = generate(client, model, prompt="import os\n", mode="auto", policy="load", queue_depth=20, audit_rate=1.0)
    stats, gate_plot, plan = outs[7], outs[13], outs[14]
    assert stats["mode"] == "auto" and stats["auto"]["chosen"] == "path_light" and stats["served_by"] == "full"
    assert "<b>Policy</b> load" in plan and "path_light" in plan and "<b>Audit</b>" in plan
    assert "no prompt gate" in json.dumps(gate_plot)  # the tiny checkpoint ships no gate
    heat = json.loads(outs[15]["plot"])["data"][0]  # token-level gate per path, from the lens
    assert heat["type"] == "heatmap" and len(heat["z"]) == 3 and len(heat["z"][0]) == stats["new_tokens"]
    with pytest.raises(AppError, match="latency policy needs"):
        generate(client, model, mode="auto", policy="latency")
    with pytest.raises(AppError, match="no prompt gate"):
        client.predict(path="light", n_steps=8, model=model, api_name="/explain_gate")


def test_sessions_are_separate(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, model = server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    generate(a, model, max_new_tokens=4)
    with pytest.raises(AppError, match="Generate or upload a trace first"):
        b.predict(token_index=0, layer=0, n_steps=8, model=model, threshold=0.3, measure="max_prob", api_name="/explain")


def test_bad_input_is_reported_and_the_app_keeps_serving(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, model = server
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="prompt is empty"):
        generate(client, model, prompt="   ")
    with pytest.raises(AppError, match="greater than maximum value 512"):
        generate(client, model, max_new_tokens=10**9)
    with pytest.raises(AppError, match="exceeds the model's context"):
        generate(client, model, max_new_tokens=200)  # the tiny model's context is 128
    with pytest.raises(AppError, match="does not exist"):
        generate(client, "/no/such/model/dir")
    with pytest.raises(AppError, match="Exit layers must be whole layer numbers"):
        generate(client, model, exit_layers="two")
    with pytest.raises(AppError, match="needs a draft model"):
        generate(client, model, mode="speculative", drafter="draft_model")
    with pytest.raises(AppError, match="does not exist"):
        generate(client, model, mode="speculative", drafter="draft_model", draft_model="/no/such/draft")
    with pytest.raises(AppError, match=r"draft_depth must be an integer in \[1, 3\]"):
        generate(client, model, mode="speculative", draft_depth=4)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "adaptive-trace", "version": 1, "traces": [{"token_id": -1}]')
    with pytest.raises(AppError, match="Could not read broken.json as an adaptive trace"):
        client.predict(file=handle_file(str(broken)), heat_value="confidence measure", api_name="/load_trace")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "adaptive-trace", "version": 1, "token_ids": [1], "stats": {"num_layers": 4},
                                 "traces": [{"token_id": 1, "position": 3, "exit_layer": 9}]}))
    with pytest.raises(AppError, match="exit layer lies outside"):
        client.predict(file=handle_file(str(wrong)), heat_value="confidence measure", api_name="/load_trace")
    dangling = tmp_path / "dangling.json"
    dangling.write_text(json.dumps({"format": "adaptive-trace", "version": 1, "token_ids": [1], "stats": {"num_layers": 4},
                                    "traces": [{"token_id": 1, "position": 3, "exit_layer": 4, "round": 2}]}))
    with pytest.raises(AppError, match="speculative round that the file does not hold"):
        client.predict(file=handle_file(str(dangling)), heat_value="confidence measure", api_name="/load_trace")
    # Still serving, and full mode is its own baseline.
    outputs = generate(client, model, mode="full", max_new_tokens=3)
    assert outputs[7]["mode"] == "full" and "its own baseline" in outputs[4]
    assert "path" not in outputs[7]  # gradio_client would take the stats for a file to download
    assert "No speculative rounds" in outputs[10]


def test_attribution_matches_the_lens_and_is_complete(tiny_checkpoint):
    """explain_exit's forward (its own autograd-friendly cache) equals the lens at that layer; IG sums to
    score(input) - score(baseline) up to its reported delta; ablation moves a hard decision by -1, 0 or +1."""
    from adaptive import Runtime
    from adaptive.lens import lens
    from explain.attribution import decision_layer, explain_exit

    rt = Runtime.from_pretrained(tiny_checkpoint)
    res = rt.generate("def main():\n", max_new_tokens=6, mode="early_exit", threshold=0.3, stop_at_eos=False)
    report = lens(rt, res.prompt_ids, res.token_ids, measure="max_prob")
    for index in (0, 5):
        layer, _ = decision_layer(res.traces[index], 4)
        attr = explain_exit(rt, res.prompt_ids, res.token_ids, index, layer, 0.3, "max_prob", n_steps=64)
        assert len(attr.ig) == len(attr.ablation) == len(res.prompt_ids) + index
        assert attr.confidence == pytest.approx(report.confidence[layer - 1][index], abs=1e-5)
        assert sum(attr.ig) == pytest.approx(attr.confidence - attr.baseline_confidence, abs=attr.ig_delta + 1e-5)
        assert set(attr.ablation) <= {-1.0, 0.0, 1.0}
    patience = explain_exit(rt, res.prompt_ids, res.token_ids, 1, 2, 0.3, "patience", n_steps=8)
    assert patience.measure == "max_prob" and "not differentiable" in patience.notes[0]


def test_page_load_sets_the_knobs_to_the_models_defaults(tiny_checkpoint, monkeypatch, tmp_path):
    import json
    import shutil

    import app

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    (model_dir / "adaptive_defaults.json").write_text(json.dumps(
        {"early_exit": {"threshold": 0.42, "measure": "margin", "exit_layers": [2, 3]}}))
    monkeypatch.setenv("ADAPTIVE_MODEL", str(model_dir))
    banner, threshold, measure, kv_policy, exit_layers, _ = app.on_page_load()
    assert threshold.value == 0.42 and measure.value == "margin" and exit_layers == "2,3"
