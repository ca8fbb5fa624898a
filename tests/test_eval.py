"""eval.py: GRA against the naive win-rate formula, the GRA command end to end, and the quick built-in experiment."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import eval as evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")


def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    policy, sft = [3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0, 4.0]
    result = evaluation.win_rate(policy, sft)
    assert result["gra"] == pytest.approx(100 * (1 + 0.5 + 0 + 1 + 1) / 5)
    assert result["lo"] <= result["gra"] <= result["hi"]
    assert evaluation.win_rate(np.ones(50), np.ones(50))["gra"] == 50.0


def test_gra_command_with_a_reward_checkpoint_judge(tiny_world, tmp_path):
    from model import load_model, save_model
    judge = load_model(tiny_world["model"], reward=True)
    save_model(judge, str(tmp_path / "judge"))
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--policy", tiny_world["model"], "--sft", tiny_world["model"],
           "--prompts", tiny_world["pairs"], "--judge", str(tmp_path / "judge"), "--eval-prompts", "6", "--max-new-tokens", "8"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["gra"] == 50.0 and result["prompts"] == 6  # a policy against itself ties everywhere


def test_quick_experiment_prints_the_table(tmp_path):
    out = tmp_path / "exp"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "results.md").read_text()
    for name in evaluation.METHODS:
        assert f"| {name} |" in table
    results = json.loads((out / "results.json").read_text())
    for row in results["seeds"][0]["methods"].values():
        assert 0.0 <= row["lo"] <= row["gra"] <= row["hi"] <= 100.0
