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

import runs
import train_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, out, *extra, nproc=1, wrapper=None):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc > 1 else [])
    cmd += [wrapper] * bool(wrapper) + [os.path.join(ROOT, "train_policy.py"), "--model", world["model"], "--data", world["pairs"], "--out", str(out),
            "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))], load_file(os.path.join(out, "model.safetensors"))


def assert_same_run(a, b, tol=1e-5):
    (log_a, weights_a), (log_b, weights_b) = a, b
    assert [round(r["step"]) for r in log_a] == [round(r["step"]) for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (key, ra, rb)
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-5), name


FSDP_CASES = {  # each against one process; bug caught
    "plain": ["--save-every", "1"],  # per-rank gradients averaged (FSDP's default) or clipped by a shard's own norm
    # the weights' sum formed per rank; an uneven split (5 pairs, 3 micro-batches) whose ranks' collectives diverge
    "accumulation+sum_w": ["--weighting", "confidence", "--normalize", "sum_w", "--grad-accum", "3", "--batch-size", "5"],
    "lora": ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"],  # a frozen base beside adapters in one group
}
HAS_LORA = "--lora-rank" in train_policy.parser().format_help()


@pytest.fixture(scope="module")
def fsdp_runs(tiny_world, tmp_path_factory):
    return {}  # case -> the 2-process run, shared by the resume test


@pytest.mark.parametrize("case", [c if c != "lora" else pytest.param(c, marks=pytest.mark.skipif(
    not HAS_LORA, reason="LoRA (branch lora) not merged yet: this case runs once --lora-rank exists")) for c in FSDP_CASES])
def test_fsdp2_over_two_gloo_processes_matches_one(tiny_world, tmp_path, fsdp_runs, case):
    one = run(tiny_world, tmp_path / "one", *FSDP_CASES[case])
    fsdp_runs[case] = two = run(tiny_world, tmp_path / "two", *FSDP_CASES[case], nproc=2)
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
    import formats
    from model import load_model, save_model
    from formats import load_tokenizer
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    examples = train_policy.encode_examples(tok, formats.load_pairs(args.data), args)
    train_policy.add_reference_logps(model, examples, 8, torch.device("cpu"))
    train_policy.train(model, examples, args, train_policy.objective_of(args), log=log)
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
        runs.run_script(train_policy.main, train_policy.parser().parse_args(argv))
    return str(info.value.code) + capsys.readouterr().err


def test_bad_sizes_files_and_options_are_one_clear_line(tiny_world, tmp_path, capsys):
    from model import GPT, config_from_hf, save_model
    base = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path / "x")]
    gpt2 = dict(model_type="gpt2", vocab_size=400, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    save_model(GPT(config_from_hf(gpt2)), str(tmp_path / "gpt2"))
    llama = json.load(open(os.path.join(tiny_world["model"], "config.json")))
    save_model(GPT(config_from_hf(dict(llama, vocab_size=300))), str(tmp_path / "small-vocab"))
    for folder in ("gpt2", "small-vocab"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tiny_world["model"], name), tmp_path / folder / name)
    zero = tmp_path / "zero.jsonl"
    zero.write_text("".join(json.dumps(dict(json.loads(line), confidence=0.0)) + "\n" for line in open(tiny_world["pairs"])))
    cases = [  # (flags, what the line must say); each bug: a traceback, or a wrong or empty message
        (["--batch-size", "0"], "must be an integer >= 1, got '0'"),      # ZeroDivisionError
        (["--batch-size", "-2"], "must be an integer >= 1, got '-2'"),    # trained nothing, exit 0
        (["--save-every", "-1"], "argument --save-every: must be an integer >= 0, got '-1'"),  # saved every step
        (["--warmup-steps", "-3"], "argument --warmup-steps: must be an integer >= 0"),  # silently a lower lr
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),      # printed only "error: 2"
        (["--data", str(tmp_path)], str(tmp_path)),                           # IsADirectoryError
        (["--loss-options", '{"beta": 0.5}'], "multiple values for argument 'beta'"),
        (["--loss", "robust", "--loss-options", '{"label_smoothing": "x"}'], "--loss robust"),
        (["--loss", "robust", "--loss-options", '{"label_smoothing": 0.5}'], "flip rate"),
        (["--loss-options", "[1]"], "must be a JSON object"),
        (["--model", str(tmp_path / "gpt2")], "max_position_embeddings 64"),  # IndexError in the position table
        # settings that train nothing, or backwards, exit 0 without these checks
        (["--beta", "0"], "argument --beta: must be a positive number, got '0'"),
        (["--beta", "-1"], "argument --beta: must be a positive number, got '-1'"),  # trains toward the rejected
        (["--loss", "ipo", "--beta", "0"], "argument --beta: must be a positive number"),  # ZeroDivisionError
        (["--lr", "0"], "argument --lr: must be a positive number, got '0'"),
        (["--max-grad-norm", "-1"], "argument --max-grad-norm: must be a positive number"),
        (["--weighting", "top", "--top-fraction", "0"], "--top-fraction 0.0 leaves no pair"),  # "no training examples"
        (["--model", str(tmp_path / "small-vocab")], "tokenizer.json has 400 tokens, more than the vocab_size 300"),
    ]
    for normalize in ("mean", "sum_w"):  # all-zero confidences: no gradient in either mode
        cases.append((["--data", str(zero), "--weighting", "confidence", "--normalize", normalize],
                      f"{zero}: --weighting confidence leaves no pair with a weight above 0"))
    for flags, message in cases:
        line = cli_error(base + flags, capsys)
        assert message in line and "Traceback" not in line, (flags, line)
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


def test_ctrl_c_is_one_line_and_exit_status_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        runs.run_script(interrupted, None)
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


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
    from model import load_model
    from formats import load_tokenizer
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
    train_policy.add_reference_logps(reference, examples, 4, torch.device("cpu"))
    seen = {}
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, limit, *a, **k):
        params = list(params)
        seen.update({id(p): p.grad.detach().clone() for p in params})
        return clip(params, limit, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    train_policy.train(policy, examples, args, train_policy.objective_of(args), log=lambda msg: None)
    logged = json.loads(open(tmp_path / "log.jsonl").readline())

    # --- here: the batch in the pairs' own order, weights from CONFIDENCES, the loss written out
    fresh = load_model(tiny_world["model"], dtype=torch.float32)
    encoded = [data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len,
                                args.max_answer_len) for p in pairs]
    batch = data.collate(encoded)
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


KILLED_IN_SECOND_CHECKPOINT = """import os, runpy, signal, sys, torch
real_save, calls = torch.save, []
def save(obj, path):  # rank 0 is killed (SIGKILL: no cleanup) inside checkpoint-2, after it began writing
    calls.append(path)
    if len(calls) == 2:
        open(path, "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path)
torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_fsdp2_resume_after_a_kill_inside_a_checkpoint_is_bitwise_and_loads_in_transformers(tiny_world, tmp_path,
                                                                                            fsdp_runs):
    import transformers
    from model import load_model
    plain = fsdp_runs.get("plain") or run(tiny_world, tmp_path / "plain", *FSDP_CASES["plain"], nproc=2)
    (tmp_path / "kill.py").write_text(KILLED_IN_SECOND_CHECKPOINT)
    out = tmp_path / "cut"
    with pytest.raises(AssertionError, match="SIGKILL"):  # bug: the kill is not a kill (the run completes)
        run(tiny_world, out, *FSDP_CASES["plain"], nproc=2, wrapper=str(tmp_path / "kill.py"))
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2.tmp", "log.jsonl"]
    resumed = run(tiny_world, out, *FSDP_CASES["plain"], "--resume", nproc=2)
    assert [r["step"] for r in resumed[0]] == [1, 2, 3]
    for name in plain[1]:  # bug: step-2 weights with step-1 optimizer state, or a shard restored on the wrong rank
        assert torch.equal(plain[1][name], resumed[1][name]), name
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    torch.testing.assert_close(theirs, load_model(str(out)).eval()(ids), atol=1e-5, rtol=1e-5)


# --- issue 17: a run owns OUT; resume only the same run; one line instead of a traceback

def main_argv(tiny_world, out, *extra):
    return ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--save-every", "1", *extra]


def test_a_run_owns_its_folder(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    runs.run_script(train_policy.main, train_policy.parser().parse_args(main_argv(tiny_world, out)))
    (out / "model.safetensors.x1.tmp").write_bytes(b"half")  # what a killed atomic_write leaves
    before = sorted(os.listdir(out))
    line = cli_error(main_argv(tiny_world, out, "--max-steps", "3"), capsys)  # bug: trains beside the old run
    assert "holds an earlier run's checkpoint-1" in line and "--overwrite" in line and sorted(os.listdir(out)) == before
    line = cli_error(main_argv(tiny_world, out, "--resume", "--beta", "0.2"), capsys)  # bug: resumes another run
    assert "--beta 0.1 there, 0.2 now" in line and "Traceback" not in line
    runs.run_script(train_policy.main, train_policy.parser().parse_args(
        main_argv(tiny_world, out, "--overwrite", "--max-steps", "1")))
    assert [json.loads(r)["step"] for r in open(out / "log.jsonl")] == [1]  # bug: log appended to, steps 1, 2, 1
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-") or n.endswith(".tmp")]


def test_resume_from_a_damaged_or_foreign_checkpoint_is_one_line(tiny_world, tmp_path, capsys):
    from model import GPT, config_from_hf, save_model
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_world["model"], model)
    argv = main_argv(tiny_world, out, "--model", str(model), "--resume")
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    runs.run_script(train_policy.main, train_policy.parser().parse_args(argv))  # leaves checkpoint-1
    assert [json.loads(r)["step"] for r in open(out / "log.jsonl")] == [1, 2]  # bug: 1, 1, 2
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a line; bug: "Unterminated string", no file named
    runs.run_script(train_policy.main, train_policy.parser().parse_args(argv))
    assert [json.loads(r)["step"] for r in open(out / "log.jsonl")] == [1, 2]
    log = (out / "log.jsonl").read_text()
    (out / "log.jsonl").write_text("{oops\n" + log)
    assert "log.jsonl: not a log" in cli_error(argv, capsys)
    (out / "log.jsonl").write_text(log)
    state = out / "checkpoint-1" / "train_state.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[:len(whole) // 2])
    line = cli_error(argv, capsys)  # bug: a RuntimeError traceback from torch.load
    assert "train_state.pt: unreadable" in line and "Traceback" not in line
    state.write_bytes(whole)
    hf = json.loads((model / "config.json").read_text())
    save_model(GPT(config_from_hf(dict(hf, hidden_size=16, num_attention_heads=2, num_key_value_heads=1))), str(model))
    line = cli_error(argv, capsys)  # bug: load_state_dict's size-mismatch traceback
    assert "tensor h.0.attn.o.weight has shape (32, 32), the model" in line and "Traceback" not in line, line


def test_a_save_killed_before_its_config_leaves_no_loadable_mix(tiny_world, tmp_path, monkeypatch):
    import model as model_module
    from model import GPT, config_from_hf, load_model, save_model
    folder = str(tmp_path / "m")
    save_model(load_model(tiny_world["model"]), folder)
    small = json.loads(open(os.path.join(tiny_world["model"], "config.json")).read())
    real = model_module.atomic_write

    def killed_at_config(path, write):
        if path.endswith("config.json"):
            raise KeyboardInterrupt
        real(path, write)
    monkeypatch.setattr(model_module, "atomic_write", killed_at_config)
    with pytest.raises(KeyboardInterrupt):
        save_model(GPT(config_from_hf(dict(small, hidden_size=16, num_attention_heads=2, num_key_value_heads=1))), folder)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no config.json"):  # bug: new weights beside the old config.json
        load_model(folder)


def test_a_global_batch_smaller_than_the_ranks_is_one_line(tiny_world, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           os.path.join(ROOT, "train_policy.py"), *main_argv(tiny_world, tmp_path / "x", "--batch-size", "1")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--batch-size 1 is smaller than the 2 ranks" in done.stderr  # bug: a hang
    assert "Traceback" not in done.stderr.split("error: ")[0] and not os.path.exists(tmp_path / "x")


def estimate(cfg, *flags, world_size=1, device="cpu", reward=False):
    args = train_policy.parser().parse_args(["--model", "m", "--data", "d", "--out", "o", *flags])
    return runs.memory_estimate(cfg, args, world_size, torch.device(device), reward)


FAMILIES = [dict(model_type="qwen2", vocab_size=1000, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=False),
            dict(model_type="opt", vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False),
            dict(model_type="gpt2", vocab_size=500, n_embd=48, n_layer=2, n_head=4, n_positions=128),
            dict(model_type="qwen3", vocab_size=1000, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=80)]  # q / k norms, head_dim != 48 / 4


def test_memory_estimate_counts_the_parameters_of_each_family_from_the_config():
    from model import GPT, RewardModel, config_from_hf
    for hf in FAMILIES:  # bug: a bias, a norm, OPT's projections or an untied head left out
        cfg = config_from_hf(hf)
        for reward in (False, True):
            with torch.device("meta"):
                built = sum(p.numel() for p in (RewardModel(cfg) if reward else GPT(cfg)).parameters())
            assert estimate(cfg, reward=reward)["parameters"] == built, (hf["model_type"], reward)
    cfg = config_from_hf(FAMILIES[0])
    est = estimate(cfg, "--lora-rank", "8", "--lora-modules", "qkv,down", world_size=4, device="cuda")
    lora = 2 * 8 * ((48 + 96) + (80 + 48))  # layers * rank * (in + out) of the fused q|k|v and of down
    assert est["trainable"] == lora and est["optimizer"] == 8 * lora / 4
    assert est["weights"] == (2 * est["parameters"] + 4 * lora) / 4
    tied = config_from_hf(dict(FAMILIES[0], tie_word_embeddings=True))  # bug: the second V x d gradient forgotten
    assert estimate(tied)["gathered"] == 4 * 1000 * 48 and estimate(cfg)["gathered"] == 0
    assert estimate(tied, "--lora-rank", "8")["gathered"] == 0  # a frozen embedding has no gradient


@pytest.mark.parametrize("hf", FAMILIES[:1] + [dict(FAMILIES[1], word_embed_proj_dim=64, activation_function="relu"),
                                               FAMILIES[2], FAMILIES[3]], ids=lambda hf: hf["model_type"])
def test_memory_estimate_activations_are_what_autograd_saves(hf):
    """One block's activations in the estimate against the bytes autograd keeps for backward, counted
    independently with saved-tensor hooks (storages, each once, parameters left out) in a model of 2 blocks minus
    one of 1, on a full micro-batch of the packed layout. Bugs: a saved tensor left out or counted twice (SwiGLU's
    gate, the rotated q and k, the CPU mask, the norms' statistics), a ReLU's output counted beside the down input."""
    import data
    from model import GPT, config_from_hf
    pairs, prompt, answer = 3, 7, 5
    examples = [{"prompt_ids": list(range(3, 3 + prompt)), "chosen_ids": [4] * answer, "rejected_ids": [5] * answer}
                for _ in range(pairs)]
    batch = data.collate(examples)
    flags = ("--no-grad-checkpointing", "--batch-size", str(pairs), "--max-prompt-len", str(prompt),
             "--max-answer-len", str(answer))
    found = {}
    for layers in (1, 2):
        cfg = config_from_hf(dict(hf, **{"n_layer" if hf["model_type"] == "gpt2" else "num_hidden_layers": layers}))
        model = GPT(cfg).init_weights().train()
        params, storages = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch["input_ids"], return_hidden=True, layout=batch)
        found[layers] = (sum(storages.values()), estimate(cfg, *flags)["activations"])
    assert found[2][0] - found[1][0] == found[2][1] - found[1][1] > 0
    checkpointed = [estimate(config_from_hf(dict(hf)), *flags[1:]), estimate(config_from_hf(dict(hf)), *flags)]
    assert checkpointed[0]["activations"] < checkpointed[1]["activations"]


# --- issue 14: LoRA. One step against the formulas: at B = 0 the gradient of y = W x + s B A x (s = alpha / r) is
# dL/dB = s (dL/dW) A^T and dL/dA = s B^T (dL/dW) = 0, with dL/dW the plain model's gradient; the base never moves.

def test_one_lora_step_matches_weighted_dpo_and_adamw_from_the_formulas(tiny_world, tmp_path, monkeypatch):
    import cwpo
    from lora import LORA_MODULES
    from model import load_model
    data, pairs, tok, reference = one_step_world(tiny_world)
    beta, lr, max_norm, rank, alpha, modules = 0.5, 1e-3, 1e-6, 2, 6.0, ("qkv", "down", "o")
    args = train_policy.parser().parse_args([
        "--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path), "--weighting",
        "confidence", "--batch-size", str(len(pairs)), "--max-steps", "1", "--lr", str(lr), "--warmup-steps", "1",
        "--max-grad-norm", str(max_norm), "--beta", str(beta), "--log-every", "1", "--lora-rank", str(rank),
        "--lora-alpha", str(alpha), "--lora-modules", ",".join(modules)])
    policy = train_policy.load_trainable(args, tok, torch.device("cpu"))
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert sorted(runs.trainable_state(policy)) == sorted(  # the checkpoint's seam: adapters only
        f"h.{i}.{LORA_MODULES[m]}.lora_{ab}" for i in range(2) for m in modules for ab in "ab")
    examples = train_policy.encode_examples(tok, pairs, args)
    train_policy.add_reference_logps(reference, examples, 4, torch.device("cpu"))
    seen, clip = {}, torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, limit, *a, **k):
        params = list(params)  # bug: clipping (and AdamW) over the frozen base too
        assert all(p.requires_grad for p in params) and len(params) == 4 * len(modules)
        seen.update({id(p): p.grad.detach().clone() for p in params})
        return clip(params, limit, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    train_policy.train(policy, examples, args, train_policy.objective_of(args), log=lambda msg: None)
    logged = json.loads(open(tmp_path / "log.jsonl").readline())

    fresh = load_model(tiny_world["model"], dtype=torch.float32)  # the plain model: W, without any adapter
    batch = data.collate([data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len,
                                           args.max_answer_len) for p in pairs])
    logps = lambda m: cwpo.sequence_logps(m, batch)["logps"]  # noqa: E731
    with torch.no_grad():
        ref_chosen, ref_rejected = logps(reference).chunk(2)
    chosen, rejected = logps(fresh).chunk(2)
    losses = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    loss = (torch.tensor(CONFIDENCES) * losses).mean()
    loss.backward()
    weights, params, grads = dict(fresh.named_parameters()), dict(policy.named_parameters()), {}
    for name in runs.trainable_state(policy):
        module = name.rsplit(".", 1)[0]
        w_grad, a = weights[module + ".weight"].grad, start[module + ".lora_a"]
        grads[name] = alpha / rank * w_grad @ a.T if name.endswith("_b") else torch.zeros_like(a)
        got = seen[id(params[name])]
        assert (got - grads[name]).norm() <= 1e-5 * grads[name].norm() + 1e-12, name  # bug: scale, transposition
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    for name, param in params.items():
        if name not in grads:  # bug: a base weight that trains
            assert torch.equal(param, start[name]), name
            continue
        g = grads[name] * max_norm / (norm + 1e-6)
        update = lr * g / (g.abs() + 1e-8)  # AdamW's first step: lr m^ / (sqrt(v^) + eps), m^ = g, v^ = g^2
        torch.testing.assert_close(param.detach(), start[name] - update, rtol=0, atol=1e-3 * lr, msg=name)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_bad_lora_flags_are_one_clear_line(tiny_world, tmp_path, capsys):
    base = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(tmp_path / "x")]
    cases = [  # (flags, what the line must say); each bug: a traceback, a run that trains something else, exit 0
        (["--lora-rank", "-1"], "got -1, 16.0"),
        (["--lora-rank", "1.5"], "argument --lora-rank: invalid int value: '1.5'"),
        (["--lora-rank", "4", "--lora-modules", "qkv,mlp"], "got 4, 16.0, 'qkv,mlp'"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "got 4, 0.0"),
        (["--lora-rank", "4", "--lora-alpha", "nan"], "got 4, nan"),
    ]
    for flags, message in cases:
        line = cli_error(base + flags, capsys)
        assert message in line and "Traceback" not in line, (flags, line)
    assert not os.path.exists(tmp_path / "x")


def test_lora_checkpoints_hold_adapters_only_and_resume_to_the_same_run(tiny_world, tmp_path):
    lora = ["--lora-rank", "2", "--lora-modules", "qkv,up", "--save-every", "1"]
    plain = run(tiny_world, tmp_path / "plain", *lora)
    shutil.copytree(tmp_path / "plain", tmp_path / "cut")  # as if killed after checkpoint-2 was written
    for name in ("model.safetensors", "config.json"):
        os.remove(tmp_path / "cut" / name)
    state = torch.load(tmp_path / "cut" / "checkpoint-2" / "train_state.pt", weights_only=True)
    assert all(".lora_" in name for name in state["model"]) and len(state["model"]) == 2 * 2 * 2  # no merged copy
    assert os.listdir(tmp_path / "cut" / "checkpoint-2") == ["train_state.pt"]
    resumed = run(tiny_world, tmp_path / "cut", *lora, "--resume")  # bug: adapters not restored, or A drawn anew
    assert_same_run(plain, resumed)
    assert all(torch.equal(plain[1][name], resumed[1][name]) for name in plain[1])


# --- issue 24: nothing lost, nothing silent

def main_run(argv):
    runs.run_script(train_policy.main, train_policy.parser().parse_args(argv))


def test_resume_with_nothing_to_resume_never_replaces_a_finished_run(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    main_run(main_argv(tiny_world, out, "--save-every", "0"))  # finished: a model and a log, no checkpoint
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    line = cli_error(main_argv(tiny_world, out, "--save-every", "0", "--resume", "--sft"), capsys)
    assert "holds a finished run's" in line and "no checkpoint" in line, line  # bug: a new run replaced it
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_an_output_that_is_the_input_is_refused(tiny_world, tmp_path, capsys):
    from model import load_model
    model = tmp_path / "model"
    shutil.copytree(tiny_world["model"], model)
    data = model / "pairs.jsonl"
    shutil.copy(tiny_world["pairs"], data)
    before = {n: (model / n).read_bytes() for n in os.listdir(model)}
    for out, flag in ((model, "--model"), (model / "sub", "--model"), (tmp_path / "x", "--data")):
        argv = main_argv(tiny_world, out, "--model", str(model), "--overwrite")
        if flag == "--data":  # --data lies inside --out's files that --overwrite would remove
            (tmp_path / "x").mkdir()
            shutil.copy(tiny_world["pairs"], tmp_path / "x" / "log.jsonl")
            argv = main_argv(tiny_world, out, "--data", str(tmp_path / "x" / "log.jsonl"), "--overwrite")
        line = cli_error(argv, capsys)  # bug: --overwrite deleted the model's tokenizer files, then "saved"
        assert flag in line and "Traceback" not in line, line
    assert {n: (model / n).read_bytes() for n in os.listdir(model)} == before
    assert (tmp_path / "x" / "log.jsonl").exists()
    load_model(str(model))


@pytest.fixture(scope="module")
def checkpointed(tiny_world, tmp_path_factory):
    """A finished 2-step run that kept its step-1 checkpoint, on a copy of the pairs: (out folder, data file)."""
    root = tmp_path_factory.mktemp("checkpointed")
    shutil.copy(tiny_world["pairs"], root / "pairs.jsonl")
    main_run(main_argv(tiny_world, root / "out", "--data", str(root / "pairs.jsonl")))
    return root / "out", root / "pairs.jsonl"


def resume_line(tiny_world, checkpointed, tmp_path, capsys, *extra, data=None):
    """Resume a copy of the checkpointed run, with `extra` flags -> the one line it stops with."""
    out = tmp_path / "out"
    shutil.copytree(checkpointed[0], out)
    argv = main_argv(tiny_world, out, "--data", str(data or checkpointed[1]), "--resume", *extra)
    return cli_error(argv, capsys)


def test_resume_refuses_data_rewritten_at_the_same_path(tiny_world, checkpointed, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"  # the same name, other pairs: the answers swapped
    rows = [json.loads(line) for line in open(checkpointed[1])]
    data.write_text("".join(json.dumps(dict(r, chosen=r["rejected"], rejected=r["chosen"])) + "\n" for r in rows))
    line = resume_line(tiny_world, checkpointed, tmp_path, capsys, "--data", str(data))
    assert "the encoded data's sha256" in line, line  # bug: the run went on with the new pairs, exit 0


@pytest.mark.parametrize("flags", [["--max-steps", "3"], ["--max-steps", "0", "--epochs", "2"]])
def test_resume_refuses_another_run_length(tiny_world, checkpointed, tmp_path, capsys, flags):
    line = resume_line(tiny_world, checkpointed, tmp_path, capsys, *flags)
    assert "--max-steps, --epochs" in line and " 2 there" in line, line  # bug: a schedule neither run follows


def damage_state(out, how):
    file = out / "checkpoint-1" / "train_state.pt"
    state = torch.load(file, weights_only=True)
    if how == "list":
        state = list(state.values())
    elif how == "step_beyond":
        state["step"] = 99
    elif how.startswith("missing_"):
        del state[how.removeprefix("missing_")]
    elif how == "nan_optimizer":
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"][0] = float("nan")
    elif how == "broken_optimizer":
        state["optimizer"]["state"] = {"wte.weight": 3}
    elif how == "int_tensor":
        name = next(iter(state["model"]))
        state["model"][name] = state["model"][name].long()
    torch.save(state, file)
    return str(file)


STATE_DAMAGE = {  # how -> what the line says beside the file's name; bug: a traceback, a bare key, or a wrong run
    "list": "not a training state", "step_beyond": "step 99", "missing_model": "key 'model'",
    "missing_step": "key 'step'", "nan_optimizer": "NaN or inf", "broken_optimizer": "optimizer state",
    "int_tensor": "dtype torch.int64"}


@pytest.mark.parametrize("how", STATE_DAMAGE)
def test_a_damaged_train_state_is_one_line_naming_the_file(tiny_world, checkpointed, tmp_path, capsys, how):
    out = tmp_path / "out"
    shutil.copytree(checkpointed[0], out)
    file = damage_state(out, how)
    line = cli_error(main_argv(tiny_world, out, "--data", str(checkpointed[1]), "--resume"), capsys)
    assert file in line and STATE_DAMAGE[how] in line and "Traceback" not in line and "lower --lr" not in line, line


def test_lora_modules_that_adapt_nothing_or_twice_are_one_line_before_any_work(tiny_world, tmp_path, capsys):
    from model import GPT, config_from_hf, save_model
    gpt2 = tmp_path / "gpt2"
    save_model(GPT(config_from_hf(dict(model_type="gpt2", vocab_size=400, n_embd=16, n_layer=1, n_head=2,
                                       n_positions=64))), str(gpt2))
    runs.copy_tokenizer(tiny_world["model"], str(gpt2))
    out = tmp_path / "x"
    base = ["--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(out), "--lora-rank", "2"]
    distinct = "--lora-modules a comma list of distinct"
    cases = [(["--lora-modules", "qkv,qkv"], "'qkv,qkv'"),  # bug: a LoRA in a LoRA, AttributeError
             (["--lora-modules", "o,o"], "'o,o'"),
             (["--model", str(gpt2), "--lora-modules", "gate", "--max-prompt-len", "16", "--max-answer-len", "16"],
              "--lora-modules gate: a gpt2 model has none of these modules")]  # bug: an empty --out
    for flags, message in cases:
        line = cli_error(base + flags, capsys)
        assert message in line and (distinct in line) == ("," in message), (flags, line)
        assert "Traceback" not in line and not out.exists(), (flags, line)


def test_a_run_stopped_by_a_non_finite_loss_leaves_nothing_that_blocks_the_next(tiny_world, tmp_path, capsys):
    out = tmp_path / "x"
    line = cli_error(main_argv(tiny_world, out, "--lr", "1e6", "--log-every", "10", "--save-every", "0"), capsys)
    assert "error: step" in line and not out.exists(), line  # bug: an empty log.jsonl
    main_run(main_argv(tiny_world, out))  # bug: "holds an earlier run's log.jsonl"
    assert [json.loads(r)["step"] for r in open(out / "log.jsonl")] == [1, 2]


def test_nothing_to_train_is_refused_for_every_objective(tiny_world, tmp_path):
    from model import load_model
    model = load_model(tiny_world["model"], dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # an empty prompt (no BOS) and a one-token answer: the answer's only token has no position to predict it
    cases = {"sft": ([], {"prompt_ids": [], "answer_ids": [5]}),
             "preference": (["--loss", "sigmoid"], {"prompt_ids": [], "chosen_ids": [5], "rejected_ids": [6],
                                                    "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0})}
    for name, (flags, example) in cases.items():
        args = train_policy.parser().parse_args(main_argv(tiny_world, tmp_path / name, *flags))
        args.objective = name
        with pytest.raises(ValueError, match="no answer token left to score"):  # bug: SFT saved the model unchanged
            train_policy.train(model, [dict(example)] * 4, args, train_policy.objective_of(args), log=lambda m: None)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_bench_memory_counts_are_at_least_one():
    for flag in ("--repeats", "--steps", "--pairs"):  # bug: --repeats 0, statistics.median of nothing, a traceback
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_memory.py"), flag, "0"], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"argument {flag}: must be an integer >= 1, got '0'" in done.stderr, done.stderr
