"""The CLI: generate prints text and writes a JSON trace; bench runs on a random model."""

import json
import subprocess
import sys
from pathlib import Path

from adaptive import GenerationResult

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adaptive", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_generate_writes_a_trace(tmp_path, tiny_checkpoint):
    out = tmp_path / "run.json"
    proc = _cli("generate", "--model", str(tiny_checkpoint), "--prompt", "def main():", "--mode", "early_exit",
                "--threshold", "0.5", "--max-new-tokens", "12", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = GenerationResult.from_json(out.read_text())
    assert 1 <= len(result.traces) <= 12
    assert proc.stdout.rstrip("\n") == result.text
    assert result.stats["mode"] == "early_exit" and result.stats["threshold"] == 0.5


def test_bench_on_random_llama(tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("bench", "--random-llama", "--repeats", "1", "--num-prompts", "1", "--max-new-tokens", "4",
                "--thresholds", "0.5", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["hf_generate", "full", "early_exit@0.5"]
    full = report["rows"][1]
    assert full["agreement"] == 1.0 and full["compute_fraction"] == 1.0 and full["tokens_per_s"] > 0
