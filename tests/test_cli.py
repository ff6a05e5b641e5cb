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
                "--thresholds", "0.5", "--threads", "1", "--speculative", "self,lookup", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["hf_generate", "hf_assistant_early_exit@2", "hf_prompt_lookup@10", "full", "early_exit@0.5",
                          "speculative_self", "speculative_lookup"]
    full = rows["full"]
    assert full["agreement"] == 1.0 and full["compute_fraction"] == 1.0 and full["tokens_per_s"] > 0
    for name in ("hf_generate", "hf_assistant_early_exit@2", "hf_prompt_lookup@10", "speculative_self", "speculative_lookup"):
        assert rows[name]["exact_prompts"] == 1.0  # lossless greedy methods reproduce full depth
    assert rows["speculative_self"]["mean_accepted"] is not None
