"""train_policy.py: data parallel, gradient accumulation and resume all train the same model as one plain process."""
import json
import os
import shutil
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


def test_a_kill_inside_a_checkpoint_resumes_to_the_plain_run_bitwise(tiny_world, tmp_path, monkeypatch):
    argv = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--max-steps", "3", "--batch-size", "8",
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1", "--save-every", "1"]
    plain = train_policy.parser().parse_args(argv + ["--out", str(tmp_path / "plain")])
    train_policy_main(plain, print)
    cut = train_policy.parser().parse_args(argv + ["--out", str(tmp_path / "cut")])
    real_save, calls = torch.save, []

    def killed_on_second_state(obj, path):  # step 2's weights are written, its optimizer state is not
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(obj, path)
    monkeypatch.setattr(train_policy.torch, "save", killed_on_second_state)
    with pytest.raises(KeyboardInterrupt):
        train_policy_main(cut, print)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-1", "checkpoint-2.tmp", "log.jsonl"]
    cut.resume = True
    train_policy_main(cut, print)  # bug: resuming from step-2 weights with step-1 optimizer state repeats a step
    log = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")]
    assert log == [1, 2, 3]  # bug: the step run again is logged twice
    assert not [n for n in os.listdir(tmp_path / "cut") if n.endswith(".tmp")]
    plain_weights, cut_weights = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "cut"))
    assert all(torch.equal(plain_weights[name], cut_weights[name]) for name in plain_weights)


def test_non_finite_training_stops_and_saves_nothing(tiny_world, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--model", tiny_world["model"], "--data",
           tiny_world["pairs"], "--out", str(tmp_path / "x"), "--max-steps", "4", "--batch-size", "8", "--lr", "1e6",
           "--warmup-steps", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "error: step" in done.stderr and "gradient norm" in done.stderr  # bug: exit 0 with every weight NaN
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


class RunsCode:  # a pickle that runs a command when loaded
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_never_runs_code_from_a_crafted_state(tiny_world, tmp_path):
    from model import load_model, save_model
    save_model(load_model(tiny_world["model"]), str(tmp_path / "checkpoint-1"))
    torch.save({"optimizer": RunsCode(), "step": 1}, str(tmp_path / "checkpoint-1" / "train_state.pt"))
    cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--model", tiny_world["model"], "--data",
           tiny_world["pairs"], "--out", str(tmp_path), "--max-steps", "2", "--resume"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert not os.path.exists(tmp_path / "pwned")  # bug: torch.load(weights_only=False)
    assert done.returncode != 0 and "not a plain training state" in done.stderr and "Traceback" not in done.stderr


def cli_error(argv, capsys):
    """The one line train_policy.py prints for bad input (argparse's own errors included), run in process."""
    with pytest.raises(SystemExit) as info:
        train_policy.run_script(train_policy.main, train_policy.parser().parse_args(argv))
    return str(info.value.code) + capsys.readouterr().err


def test_bad_sizes_files_and_options_are_one_clear_line(tiny_world, tmp_path, capsys):
    from model import GPT, config_from_hf, save_model
    base = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path / "x")]
    gpt2 = dict(model_type="gpt2", vocab_size=400, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    save_model(GPT(config_from_hf(gpt2)), str(tmp_path / "gpt2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world["model"], name), tmp_path / "gpt2" / name)
    cases = [  # (flags, what the line must say); each bug: a traceback, or a wrong or empty message
        (["--batch-size", "0"], "must be a positive integer, got '0'"),      # ZeroDivisionError
        (["--batch-size", "-2"], "must be a positive integer, got '-2'"),    # trained nothing, exit 0
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),      # printed only "error: 2"
        (["--data", str(tmp_path)], str(tmp_path)),                           # IsADirectoryError
        (["--loss-options", '{"beta": 0.5}'], "multiple values for argument 'beta'"),
        (["--loss", "robust", "--loss-options", '{"label_smoothing": "x"}'], "--loss robust"),
        (["--loss", "robust", "--loss-options", '{"label_smoothing": 0.5}'], "flip rate"),
        (["--loss-options", "[1]"], "must be a JSON object"),
        (["--model", str(tmp_path / "gpt2")], "max_position_embeddings 64"),  # IndexError in the position table
    ]
    for flags, message in cases:
        line = cli_error(base + flags, capsys)
        assert message in line and "Traceback" not in line, (flags, line)
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


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


# --- issue 10: weights, gradients, autocast
# One optimizer step of train_policy.train against a step computed here from the formulas: the pipeline tests above
# compare the script with itself, so a bug present on both sides (weights dropped, permuted or normalized wrongly)
# passes them; this one does not.

import torch.nn.functional as F  # noqa: E402

CONFIDENCES = [0.9, 0.1, 0.5, 0.3, 0.75, 0.2]  # unequal, not symmetric: dropping, permuting or rescaling them shows


def one_step_world(tiny_world):
    """Six pairs of the tiny world with CONFIDENCES, the tokenizer, the policy and a different reference model (so
    that the first step's log-ratios are not 0 and each pair has its own loss)."""
    import data
    from model import load_model, load_tokenizer
    pairs = [json.loads(line) for line in open(tiny_world["pairs"])][:len(CONFIDENCES)]
    for p, c in zip(pairs, CONFIDENCES):
        p["confidence"] = c
    reference = load_model(tiny_world["model"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return data, pairs, load_tokenizer(tiny_world["model"]), reference


@pytest.mark.parametrize("normalize, grad_accum", [("mean", 1), ("mean", 2), ("sum_w", 1), ("sum_w", 2)])
def test_one_step_matches_weighted_dpo_and_adamw_from_the_formulas(tiny_world, tmp_path, monkeypatch, normalize,
                                                                    grad_accum):
    import cwpo
    from model import load_model
    data, pairs, tok, reference = one_step_world(tiny_world)
    beta, lr, warmup, max_norm = 0.5, 1e-3, 4, 1e-6
    args = train_policy.parser().parse_args([
        "--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path), "--weighting",
        "confidence", "--normalize", normalize, "--grad-accum", str(grad_accum), "--batch-size", str(len(pairs)),
        "--max-steps", "1", "--lr", str(lr), "--warmup-steps", str(warmup), "--max-grad-norm", str(max_norm),
        "--beta", str(beta), "--log-every", "1"])

    # --- the script: encode_examples (weights), add_reference_logps, train; the gradient is read before clipping
    policy = load_model(tiny_world["model"], dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    examples = train_policy.encode_examples(tok, pairs, args)
    train_policy.add_reference_logps(reference, examples, tok.pad_id, 4, torch.device("cpu"))
    seen = {}
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, limit, *a, **k):
        params = list(params)
        seen.update({id(p): p.grad.detach().clone() for p in params})
        return clip(params, limit, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    train_policy.train(policy, examples, tok.pad_id, args, train_policy.preference_objective, log=lambda msg: None)
    logged = json.loads(open(tmp_path / "log.jsonl").readline())

    # --- here: the batch in the pairs' own order, weights from CONFIDENCES, the loss written out
    fresh = load_model(tiny_world["model"], dtype=torch.float32)
    encoded = [data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len,
                                args.max_answer_len) for p in pairs]
    batch = data.collate(encoded, tok.pad_id)
    logps = lambda m: cwpo.sequence_logps(m, batch)["logps"]  # noqa: E731
    with torch.no_grad():
        ref_chosen, ref_rejected = logps(reference).chunk(2)
    chosen, rejected = logps(fresh).chunk(2)
    losses = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    c = torch.tensor(CONFIDENCES)
    loss = (c * losses).mean() if normalize == "mean" else (c * losses).sum() / c.sum()
    loss.backward()
    params = dict(policy.named_parameters())
    grads = {n: p.grad for n, p in fresh.named_parameters()}
    for name, g in grads.items():
        err = (seen[id(params[name])] - g).norm() / g.norm()  # elementwise, summation order shows near 0
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"

    # AdamW's first step from that gradient: clipped to max_norm, lr of step 0 under linear warmup, betas (0.9, 0.95).
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g) whatever the scale of g; max_norm is chosen so
    # that the clipped |g| is near eps = 1e-8, where the update also depends on the clipped scale.
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    scale, step_lr = max_norm / (norm + 1e-6), lr * (0 + 1) / warmup
    for name, g in grads.items():
        g = g * scale
        m, v = (1 - 0.9) * g, (1 - 0.95) * g * g
        update = step_lr * (m / (1 - 0.9)) / ((v / (1 - 0.95)).sqrt() + 1e-8)
        torch.testing.assert_close(params[name].detach(), start[name] - update, rtol=0, atol=1e-3 * step_lr,
                                   msg=lambda text: f"{name}: {text}")
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)  # the logged loss: sum(w l) / the denominator
