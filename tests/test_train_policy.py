"""train_policy.py: data parallel, gradient accumulation and resume all train the same model as one plain process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, out, *extra, nproc=1):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc > 1 else [])
    cmd += [os.path.join(ROOT, "train_policy.py"), "--model", world["model"], "--data", world["pairs"], "--out", str(out),
            "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))], load_file(os.path.join(out, "model.safetensors"))


def assert_same_run(a, b, tol=1e-5):
    (log_a, weights_a), (log_b, weights_b) = a, b
    assert [round(r["step"]) for r in log_a] == [round(r["step"]) for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "accuracy", "margin"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (key, ra, rb)
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-5), name


@pytest.mark.parametrize("weighting", ["none", "confidence"])
def test_two_gloo_processes_match_one(tiny_world, tmp_path, weighting):
    one = run(tiny_world, tmp_path / "one", "--weighting", weighting)
    two = run(tiny_world, tmp_path / "two", "--weighting", weighting, nproc=2)
    assert_same_run(one, two)
    assert one[0][0]["loss"] > 0


def test_gradient_accumulation_matches_one_batch(tiny_world, tmp_path):
    assert_same_run(run(tiny_world, tmp_path / "a", "--weighting", "confidence", "--normalize", "sum_w"),
                    run(tiny_world, tmp_path / "b", "--weighting", "confidence", "--normalize", "sum_w", "--grad-accum", "3"))


def test_sft_accumulation_is_token_weighted(tiny_world, tmp_path):
    assert_same_run(run(tiny_world, tmp_path / "a", "--sft"), run(tiny_world, tmp_path / "b", "--sft", "--grad-accum", "2"))


def test_resume_continues_the_same_run(tiny_world, tmp_path):
    full = run(tiny_world, tmp_path / "full", "--save-every", "1")
    args = train_policy.parser().parse_args(["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path / "cut"),
                                             "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1",
                                             "--log-every", "1", "--save-every", "1"])

    def crash_at_step_3(msg):
        if msg.startswith("step 3/3"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # killed after step 2 was checkpointed
        train_policy_main(args, crash_at_step_3)
    args.resume = True
    train_policy_main(args, print)
    log = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]  # the crashed step 3 was redone after the restart
    assert_same_run(full, (log, load_file(str(tmp_path / "cut" / "model.safetensors"))))


def train_policy_main(args, log):
    import data
    from model import load_model, load_tokenizer, save_model
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    examples = train_policy.encode_examples(tok, data.load_pairs(args.data), args)
    train_policy.add_reference_logps(model, examples, tok.pad_id, 8, torch.device("cpu"))
    train_policy.train(model, examples, tok.pad_id, args, train_policy.preference_objective, log=log)
    save_model(model, args.out)


def test_weighting_modes(tiny_world):
    pairs = [{"confidence": c} for c in (0.9, 0.1, 0.5, 0.7)]
    assert train_policy.pair_weights(pairs, "confidence", 0.5)[1] == pytest.approx([0.9, 0.1, 0.5, 0.7])
    kept, weights = train_policy.pair_weights(pairs, "top", 0.5)  # the two most confident, weight 1
    assert [p["confidence"] for p in kept] == [0.9, 0.7] and weights == [1.0, 1.0]
    with pytest.raises(ValueError, match="confidence"):
        train_policy.pair_weights([{}], "confidence", 0.5)


def test_clear_errors(tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n')
    for data_file, extra, message in ((tiny_world["pairs"], ["--loss", "dpoo"], "unknown loss type 'dpoo'; known: sigmoid"),
                                      (str(bad), [], "bad.jsonl, line 2")):
        cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--model", tiny_world["model"], "--data", data_file,
               "--out", str(tmp_path / "x"), *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
