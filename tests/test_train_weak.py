"""train_weak.py: the annotator learns, its labels and confidences follow the paper's confidence, its report is the naive one."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import runs
import train_weak

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_weak_labels_take_the_higher_score_with_bt_confidence():
    pairs = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "u", "rejected": "v"}]
    labels = train_weak.weak_labels(pairs, torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 2.0]))
    assert (labels[0]["chosen"], labels[0]["rejected"], labels[0]["human_agrees"]) == ("x", "y", 1)
    assert (labels[1]["chosen"], labels[1]["rejected"], labels[1]["human_agrees"]) == ("v", "u", 0)
    for label, margin in zip(labels, (0.8, 3.0)):
        assert label["confidence"] == pytest.approx(2 * (1 / (1 + math.exp(-margin)) - 0.5), rel=1e-6)
        assert label["score_chosen"] - label["score_rejected"] == pytest.approx(margin, rel=1e-6)


def test_annotator_report_matches_naive_computation():
    rng = np.random.default_rng(0)
    confidence = rng.random(200)
    correct = (rng.random(200) < 0.5 + confidence / 2).astype(int)
    report = train_weak.annotator_report(confidence, correct)
    ranked = sorted(zip(confidence, correct), key=lambda t: -t[0])
    assert report["accuracy"] == pytest.approx(correct.mean())
    for name, part in (("top10", ranked[:20]), ("top30", ranked[:60]), ("top50", ranked[:100]), ("bottom50", ranked[100:])):
        assert report[f"accuracy_{name}"] == pytest.approx(np.mean([c for _, c in part]))
    z, p = 1.96, correct.mean()  # Wilson's score interval
    center, half_width = (p + z * z / 400) / (1 + z * z / 200), z * math.sqrt(p * (1 - p) / 200 + z * z / 160000) / (1 + z * z / 200)
    assert (report["accuracy_lo"], report["accuracy_hi"]) == pytest.approx((center - half_width, center + half_width))
    ece, bins = 0.0, list(report["bins"])
    for b in range(10):  # bins of p = (1 + C) / 2 over [0.5, 1]
        inside = [(0.5 + c / 2, ok) for c, ok in zip(confidence, correct) if b / 10 <= c < (b + 1) / 10]
        if inside:
            ece += len(inside) / 200 * abs(np.mean([p for p, _ in inside]) - np.mean([ok for _, ok in inside]))
            assert {"pairs": len(inside), "mean_p": pytest.approx(np.mean([p for p, _ in inside])),
                    "accuracy": pytest.approx(np.mean([ok for _, ok in inside]))}.items() <= bins.pop(0).items()
    assert report["ece"] == pytest.approx(ece) and not bins


def test_annotator_learns_an_easy_preference_and_writes_its_files(tiny_world, tmp_path):
    pairs = [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": " Sure! Enjoy!", "rejected": " Ugh, whatever."}
             for i in range(60)]
    pairs += [{"prompt": f"\n\nHuman: tie {i}?\n\nAssistant:", "chosen": " Sure!", "rejected": " Sure!"} for i in range(30)]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    good, bad = " Sure! Enjoy!", " Ugh, whatever."
    unlabeled = [{"prompt": f"\n\nHuman: new {i}?\n\nAssistant:", "answer_a": (good, bad)[i % 2], "answer_b": (bad, good)[i % 2]}
                 for i in range(6)]  # the good answer first or second
    (tmp_path / "unlabeled.jsonl").write_text("".join(json.dumps(p) + "\n" for p in unlabeled))
    out = tmp_path / "weak"
    cmd = [sys.executable, os.path.join(ROOT, "train_weak.py"), "--model", tiny_world["model"], "--data", str(tmp_path / "easy.jsonl"),
           "--out", str(out), "--labeled-fraction", "0.5", "--eval-size", "10", "--epochs", "10", "--batch-size", "8",
           "--lr", "3e-3", "--log-every", "100", "--unlabeled", str(tmp_path / "unlabeled.jsonl")]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    ties = sum(p["chosen"] == p["rejected"] for p in map(json.loads, open(out / "splits" / "heldout.jsonl")))
    assert ties > 0 and report["ties_left_out"] == ties  # bug: a tie counted as agreement (accuracy 1.0 on it)
    assert report["accuracy"] == 1.0 and report["pairs"] == 10 - ties
    labels = [json.loads(line) for line in open(out / "weak_labels.jsonl")]
    assert len(labels) == 6 and all(label["chosen"] == good and label["rejected"] == bad for label in labels)
    assert all(0.0 <= label["confidence"] <= 1.0 for label in labels)
    splits = {name: sum(1 for _ in open(out / "splits" / f"{name}.jsonl")) for name in ("labeled", "human_pool", "heldout")}
    assert splits == {"labeled": 40, "human_pool": 80, "heldout": 10}
    assert os.path.exists(out / "model.safetensors") and not any(f.endswith(".tmp") for f in os.listdir(out))


def test_gradient_checkpointing_reaches_the_annotators_decoder(tiny_world, tmp_path, monkeypatch):
    # bug: train() set the flag on the RewardModel, whose decoder (.body) never saw it: no memory saved at 135M
    import torch.utils.checkpoint
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    pairs = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Sure!", "rejected": " Ugh."}] * 4
    args = train_weak.parser().parse_args(["--model", tiny_world["model"], "--data", "-", "--out", str(tmp_path),
                                           "--max-steps", "1", "--batch-size", "4"])
    train_weak.train_annotator(pairs, args, torch.device("cpu"), log=lambda *a: None)
    assert len(calls) == 2  # one per layer of the tiny model


def test_a_report_on_ties_only_is_refused_before_training(tiny_world, tmp_path):
    pairs = [{"prompt": f"\n\nHuman: q {i}?\n\nAssistant:", "chosen": " Same.", "rejected": " Same."} for i in range(20)]
    (tmp_path / "ties.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = train_weak.parser().parse_args(["--model", tiny_world["model"], "--data", str(tmp_path / "ties.jsonl"),
                                           "--out", str(tmp_path / "weak"), "--eval-size", "5"])
    with pytest.raises(ValueError, match="ties.jsonl: every pair the report is on has two identical answers"):
        train_weak.main(args)  # bug: ZeroDivisionError in the report, after training and saving the annotator
    assert not (tmp_path / "weak").exists()


def test_outputs_of_two_runs_never_mix(tiny_world, tmp_path, capsys):
    out = tmp_path / "weak"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "answer_a": "x"}\n')
    argv = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(out), "--max-steps", "1",
            "--batch-size", "4"]
    for extra, message in (([], "holds an earlier run's report.json"),  # bug: the new model beside the old report
                           (["--overwrite", "--unlabeled", str(tmp_path / "bad.jsonl")], "bad.jsonl, line 1")):
        with pytest.raises(SystemExit) as info:  # bug: --unlabeled read only after training and saving the model
            runs.run_script(train_weak.main, train_weak.parser().parse_args(argv + extra))
        assert message in str(info.value.code)
        assert os.listdir(out) == ["report.json"]


def test_lora_annotator_trains_its_adapters_and_its_whole_head(tiny_world, tmp_path):
    from model import load_model
    pairs = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Sure!", "rejected": " Ugh."}] * 4
    args = train_weak.parser().parse_args(["--model", tiny_world["model"], "--data", "-", "--out", str(tmp_path),
                                           "--max-steps", "1", "--batch-size", "4", "--lora-rank", "2"])
    torch.manual_seed(0)  # the fresh head is drawn from torch's generator: the same head in `start`
    rm, _ = train_weak.train_annotator(pairs, args, torch.device("cpu"), log=lambda *a: None)
    torch.manual_seed(0)
    start = load_model(tiny_world["model"], reward=True)
    trained = runs.trainable_state(rm)
    assert all(".lora_" in name for name in trained if name != "score.weight")
    assert not torch.equal(trained["score.weight"], start.score.weight)  # bug: the head frozen with the base
    assert torch.equal(rm.body.h[0].mlp.up.linear.weight, start.body.h[0].mlp.up.weight)


# --- issue 24: nothing lost, nothing silent

def test_torchrun_is_refused_before_any_work(tiny_world, tmp_path, monkeypatch):
    out = tmp_path / "weak"
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; bug: each rank ran the whole job into one --out
    argv = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(out), "--max-steps", "1"]
    with pytest.raises(SystemExit) as info:
        runs.run_script(train_weak.main, train_weak.parser().parse_args(argv))
    assert "train_weak.py runs in one process" in str(info.value.code) and not out.exists()


def test_the_accuracy_interval_stays_inside_0_and_1():
    report = train_weak.annotator_report([0.9, 0.8, 0.7, 0.6], [1, 1, 1, 0])  # bug: the normal interval's 1.174
    assert (report["accuracy_lo"], report["accuracy_hi"]) == pytest.approx((0.30064, 0.95441), abs=1e-5)
    report = train_weak.annotator_report([0.9] * 5, [1] * 5)
    assert 0 <= report["accuracy_lo"] < report["accuracy_hi"] == 1.0


@pytest.mark.parametrize("size", ["1.5", "inf", "nan", "-0.1", "-2", "x"])
def test_eval_size_is_a_fraction_or_a_whole_count(size, capsys):
    argv = ["--model", "m", "--data", "d", "--out", "o", "--eval-size", size]
    with pytest.raises(SystemExit):  # bug: 1.5 silently one pair; inf and nan tracebacks
        train_weak.parser().parse_args(argv)
    assert f"argument --eval-size: must be a fraction in [0, 1) or a whole count, got '{size}'" in capsys.readouterr().err
    for good, value in (("0.25", 0.25), ("10", 10), ("0", 0.0)):
        assert train_weak.parser().parse_args(argv[:-1] + [good]).eval_size == value
