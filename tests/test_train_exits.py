"""train-exits: adapters trained on a frozen tiny model bring exits closer to the final layer."""

import subprocess
import sys
from pathlib import Path

import torch

from adaptive import Runtime
from adaptive.exits import ADAPTER_FILE
from adaptive.training.train_exits import _hidden_states

ROOT = Path(__file__).resolve().parent.parent


def _mean_kl(rt, ids):
    hidden, final = _hidden_states(rt, ids)
    with torch.inference_mode():
        kls = []
        for k, h in enumerate(hidden, start=1):
            logp = torch.log_softmax(rt.heads.logits(h, k).float(), -1)
            kls.append(float((final.exp() * (final - logp)).sum(-1).mean()))
    return sum(kls) / len(kls)


def test_adapters_reduce_kl_and_resume(tmp_path, tiny_checkpoint):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("def main():\n    return 0\n\nimport os\nprint('hello world')\n" * 40)
    before = Runtime.from_pretrained(model_dir)
    ids = torch.tensor([before.encode(text.read_text())[:64]])
    kl_before = _mean_kl(before, ids)
    cmd = [sys.executable, "-m", "adaptive", "train-exits", "--model", str(model_dir), "--text", str(text),
           "--steps", "30", "--batch", "2", "--seq-len", "32", "--positions", "64", "--lr", "3e-3",
           "--run-dir", str(tmp_path / "run"), "--threads", "1"]
    first = subprocess.run(cmd[:-6] + ["--steps", "15"] + cmd[-4:], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)  # resumes at step 15
    assert second.returncode == 0, second.stderr
    assert "after 30 steps" in second.stdout
    assert (model_dir / ADAPTER_FILE).is_file()
    after = Runtime.from_pretrained(model_dir)
    assert after.heads.source.startswith("adapters")
    assert _mean_kl(after, ids) < 0.8 * kl_before


def test_exit_classifier_trains_loads_and_decides(tmp_path, tiny_checkpoint):
    import shutil

    from adaptive.exit_classifier import CLASSIFIER_FILE

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("def main():\n    return 0\n\nimport os\nprint('hello world')\n" * 40)
    proc = subprocess.run([sys.executable, "-m", "adaptive", "train-exit-classifier", "--model", str(model_dir),
                           "--text", str(text), "--steps", "20", "--batch", "2", "--seq-len", "32",
                           "--positions", "64", "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (model_dir / CLASSIFIER_FILE).is_file()
    rt = Runtime.from_pretrained(model_dir)
    assert rt.exit_classifier is not None
    prompt = rt.encode("def main():")
    full = rt.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    never = rt.generate(prompt, max_new_tokens=12, stop_at_eos=False, mode="early_exit", measure="classifier", threshold=1.0)
    assert never.token_ids == full.token_ids
    # a check costs the classifier's MACs but no LM head: never-exit costs just a little more than full
    assert 1.0 < never.stats["compute_fraction"] < 1.05
    always = rt.generate(prompt, max_new_tokens=12, stop_at_eos=False, mode="early_exit", measure="classifier",
                         threshold=0.0, exit_layers=(1,))
    assert all(t.exit_layer == 1 for t in always.traces[1:])
    assert all(0.0 <= t.confidence <= 1.0 for t in always.traces[1:])


def test_soft_exit_policy_expectations():
    """The differentiable exit policy's expectations, checked on cases with known answers."""
    import torch

    from adaptive.training.train_exit_classifier import soft_exit_policy

    agree = torch.tensor([[0.0], [1.0], [1.0]])  # exits 1..3 of a 4-layer model; exit 1 would disagree
    never = torch.zeros(3, 1)
    d, layers = soft_exit_policy(never, agree)
    assert float(d) == 0.0 and float(layers) == 4.0  # never exiting: full depth, always agrees
    first = torch.tensor([[1.0], [0.0], [0.0]])
    d, layers = soft_exit_policy(first, agree)
    assert float(d) == 1.0 and float(layers) == 1.0  # always exiting at 1: one layer, disagrees
    half = torch.full((3, 1), 0.5)
    d, layers = soft_exit_policy(half, agree)
    assert float(d) == 0.5 and float(layers) == 0.5 * 1 + 0.25 * 2 + 0.125 * 3 + 0.125 * 4
    p = torch.full((3, 1), 0.3, requires_grad=True)
    d, layers = soft_exit_policy(p, agree)
    (d + layers).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
