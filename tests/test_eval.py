"""eval.py: GRA against the naive win-rate formula, the GRA command against transformers, and a small built-in
experiment whose table is recomputed from its results.json and whose world checks must hold."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as evaluation
from tools import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")


def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    policy, sft = [3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0, 4.0]
    result = evaluation.win_rate(policy, sft)
    assert result["gra"] == pytest.approx(100 * (1 + 0.5 + 0 + 1 + 1) / 5)
    assert result["lo"] <= result["gra"] <= result["hi"]
    assert evaluation.win_rate(np.ones(50), np.ones(50))["gra"] == 50.0


def test_interval_is_the_t_interval():
    values = [1.0, 2.0, 4.0, 7.0, 11.0]  # s.d. 4.0620, t(0.975, 4 df) = 2.776
    mean, half = evaluation.interval(values)
    assert mean == 5.0 and half == pytest.approx(2.776 * 4.0620 / 5 ** 0.5, rel=1e-3)
    assert evaluation.interval([3.0])[0] == 3.0 and np.isnan(evaluation.interval([3.0])[1])  # no interval from one


def test_gra_command_against_transformers_generation_and_scoring(tiny_world, tmp_path):
    """Two different policies, judged by a reward checkpoint; the expected GRA is computed independently: greedy
    answers from transformers' generate, scores from its sequence-classification model, the naive win rate."""
    import transformers
    from model import GPT, load_model, save_model
    other = tmp_path / "other"
    torch.manual_seed(1)
    policy = GPT(load_model(tiny_world["model"]).config)
    for p in policy.parameters():  # large random weights: varied answers, unlike the small-init model's
        torch.nn.init.normal_(p, std=0.5)
    save_model(policy, str(other))
    judge = tmp_path / "judge"
    torch.manual_seed(2)
    save_model(load_model(tiny_world["model"], reward=True), str(judge))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world["model"], name), other / name)
    prompts = sorted({json.loads(line)["prompt"] for line in open(tiny_world["pairs"])})[:20]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_world["model"])
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(judge)).eval()
    scores = {}
    for name, path in (("policy", tiny_world["model"]), ("sft", str(other))):
        lm = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        scores[name] = []
        for prompt in prompts:
            ids = torch.tensor([tok(prompt).input_ids])
            new = lm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            text = tok.decode(new)
            seq = tok(prompt).input_ids + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            scores[name].append(rm(torch.tensor([seq])).logits[0, 0].item())
    wins = [(p > s) + 0.5 * (p == s) for p, s in zip(scores["policy"], scores["sft"])]
    expected = 100 * np.mean(wins)
    assert expected != 50.0  # the two policies' answers differ, and the judge prefers one of them
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--policy", tiny_world["model"], "--sft", str(other),
           "--prompts", tiny_world["pairs"], "--judge", str(judge), "--eval-prompts", "20", "--max-new-tokens", "8"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 20 and result["gra"] == pytest.approx(expected)


def test_small_experiment_table_is_recomputed_from_results_and_world_checks_hold(tmp_path, monkeypatch, capsys):
    # small enough for the suite (about a minute), large enough that the world checks below hold at this scale
    methods = ("DPO, human 100 %", "DPO, labeled part only", "CW-DPO")
    monkeypatch.setattr(evaluation, "METHODS", {name: evaluation.METHODS[name] for name in methods})
    args = argparse.Namespace(out=str(tmp_path), sweep=False, seeds=2, pairs=600, eval_prompts=60, samples=4,
                              sft_examples=600, epochs=2, lr=3e-4, beta=0.3, labeled_fraction=0.3)
    evaluation.experiment(args)
    assert "seed 2 of 2 | step 8 of 8" in capsys.readouterr().out  # progress: seed k of N, step m of M
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["runs"][0]
    table = (tmp_path / "results.md").read_text()
    for name in methods:  # mean, t-interval and paired difference, recomputed from the per-seed numbers
        gra = [s["methods"][name]["gra"] for s in run["seeds"]]
        diff = [g - s["methods"][methods[0]]["gra"] for g, s in zip(gra, run["seeds"])]
        half = 12.71 * np.std(gra, ddof=1) / np.sqrt(2)
        assert f"| {name} | {np.mean(gra):.1f} [{np.mean(gra) - half:.1f}, {np.mean(gra) + half:.1f}] |" in table
        if name != methods[0]:
            assert f"{np.mean(diff):+.1f} [{np.mean(diff) - 12.71 * np.std(diff, ddof=1) / np.sqrt(2):+.1f}" in table
    # the world checks at this scale: preference training must beat SFT, and the annotator must beat chance where
    # it is confident (a flipped loss sign, swapped labels or a dropped human label would fail here)
    for seed in run["seeds"]:
        assert seed["methods"]["DPO, human 100 %"]["gra"] > 55
        assert seed["annotator_vs_gold"]["accuracy_top30"] > seed["annotator_vs_gold"]["accuracy"] > 0.6
    assert {c["check"] for c in run["checks"]} == {c["check"] for c in evaluation.world_checks(run["seeds"])}
    bins = figures.pooled_bins([s["annotator_vs_gold"]["bins"] for s in run["seeds"]])
    assert sum(b["pairs"] for b in bins) == sum(s["annotator_vs_gold"]["pairs"] for s in run["seeds"])
    assert (tmp_path / "reliability-30.svg").read_text().count("<rect") == 1 + len(bins)  # background + a bar a bin
