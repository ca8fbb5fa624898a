"""eval.py: GRA (cwpo.win_rate) against the naive win-rate formula, and the GRA command against transformers."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cwpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")


def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    policy, sft = [3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0, 4.0]
    result = cwpo.win_rate(policy, sft)
    assert result["gra"] == pytest.approx(100 * (1 + 0.5 + 0 + 1 + 1) / 5)
    assert result["lo"] <= result["gra"] <= result["hi"]
    assert cwpo.win_rate(np.ones(50), np.ones(50))["gra"] == 50.0


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
