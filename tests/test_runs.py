"""runs.py's bf16 switch (runs.bf16_enabled) and bf16 autocast on CPUs that have it, against fp32.

Tolerances are bf16's: 8 bits of mantissa, a relative rounding of 2^-9 per operand. Where a tolerance is
stated, the measured error of the code as written is beside it, and how far a broken variant lands (the kernel
accumulating in bf16; training left in fp32) was checked by breaking the code once.
"""
import json

import pytest
import torch

import runs
import cwpo
import data
import train_policy
from test_cwpo import LOSS_OPTIONS, make_pairs, tiny_gpt

needs_bf16 = pytest.mark.skipif(not runs.cpu_has_bf16(), reason="this CPU has no native bf16")
CPU = torch.device("cpu")


def test_bf16_switch_defaults_and_the_one_line(monkeypatch, capsys):
    """Unset: on for CUDA, off for CPU; --no-bf16 off everywhere; --bf16 on a CPU without bf16: fp32, one line."""
    cuda = torch.device("cuda")
    assert runs.bf16_enabled(None, cuda) and runs.bf16_enabled(True, cuda) and not runs.bf16_enabled(False, cuda)
    assert not runs.bf16_enabled(None, CPU) and not runs.bf16_enabled(False, CPU)
    assert runs.bf16_enabled(True, CPU) == runs.cpu_has_bf16()
    capsys.readouterr()  # a CPU without bf16 has printed the line already

    monkeypatch.setattr(runs, "cpu_has_bf16", lambda: False)
    runs.no_bf16_notice.cache_clear()
    assert not runs.bf16_enabled(True, CPU) and not runs.bf16_enabled(True, CPU)
    assert capsys.readouterr().out == "--bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); running fp32\n"
    runs.no_bf16_notice.cache_clear()

    args = train_policy.parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert args.bf16 is None  # the device decides


def test_benchmarks_refuse_bf16_in_one_line_on_a_cpu_without_it(monkeypatch):
    """A bench's bf16 flag on a CPU without bf16 is refused, naming the flag: it would time fp32 as bf16."""
    monkeypatch.setattr(runs, "cpu_has_bf16", lambda: True)
    runs.require_cpu_bf16("--dtypes")

    monkeypatch.setattr(runs, "cpu_has_bf16", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: --dtypes needs a CPU with native bf16"):
        runs.require_cpu_bf16("--dtypes")


@needs_bf16
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bf16_autocast_logps_every_loss_and_gradient_close_to_fp32(family):
    """Under CPU bf16 autocast: the per-token log-probs are the bf16 LM-head GEMM of the body's output with
    everything after it in fp32 (to 1e-4, measured <= 1e-6; the kernel accumulating in bf16: 1e-2 off); the
    answers' log-probs within 2 % of their scale of fp32's (measured 0.3 %), every loss of cwpo.LOSS_TYPES within
    2 % or 2e-2 and each gradient within 8 % relative Frobenius error (measured <= 4.7 %: bf16 all through the
    body of a model with weights at std 0.3), while not equal to fp32's (bf16 did run)."""
    model, pairs = tiny_gpt(family, seed=1, dtype=torch.float32), make_pairs(seed=1)
    B = len(pairs)
    batch = data.collate([dict(p, weight=w) for p, w in zip(pairs, torch.linspace(0.2, 1.0, B).tolist())])
    ref_chosen, ref_rejected = -20 * torch.rand(B), -20 * torch.rand(B)

    seen = []
    model.ln_f.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cwpo.sequence_logps(model, batch)
    hidden = seen[-1].flatten(0, 1)[batch["score_index"]].bfloat16()  # [N, d] as the kernel sees it
    logits = (hidden @ model.lm_head.weight.bfloat16().t()).float()  # the bf16 GEMM, everything after in fp32
    naive = logits.log_softmax(-1).gather(1, batch["score_target"][:, None])[:, 0]
    torch.testing.assert_close(out["token_logps"], naive, rtol=0, atol=1e-4)

    def run(name, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = cwpo.sequence_logps(model, batch)["logps"]
            loss, _ = cwpo.batch_loss(model, batch, ref_chosen, ref_rejected, name, beta=0.3,
                                      **LOSS_OPTIONS.get(name, {}))
        return out, loss, torch.autograd.grad(loss, list(model.parameters()))

    for name in cwpo.LOSS_TYPES:
        batch["weight"] = torch.ones(B) if name.startswith("aot") else torch.linspace(0.2, 1.0, B)
        logps, loss, grads = run(name, bf16=True)
        logps32, loss32, grads32 = run(name, bf16=False)
        assert logps.dtype == torch.float32
        assert (logps - logps32).abs().max() <= 2e-2 * logps32.abs().max(), name
        assert (logps - logps32).abs().max() > 0, name  # bf16 did run
        torch.testing.assert_close(loss, loss32, rtol=2e-2, atol=2e-2, msg=name)
        for g, r in zip(grads, grads32):
            assert g.dtype == torch.float32  # fp32 master weights get fp32 gradients
            assert (g - r).norm() <= 8e-2 * r.norm() + 1e-6, name


@needs_bf16
def test_a_bf16_dpo_step_updates_as_fp32(tiny_world, tmp_path):
    """Two DPO steps of train_policy.train with --bf16 on CPU against --no-bf16: the same losses within 2e-2
    and weight updates within 15 % relative error of the fp32 update (measured 6 %: AdamW's first steps are
    nearly sign(g), which bf16 flips where g is near 0), while the updates are not equal (bf16 did run)."""
    from formats import load_tokenizer
    from model import load_model
    pairs = [json.loads(line) for line in open(tiny_world["pairs"])][:8]
    tok = load_tokenizer(tiny_world["model"])
    results = {}
    for flag in ("--bf16", "--no-bf16"):
        out = tmp_path / flag
        args = train_policy.parser().parse_args([
            "--model", tiny_world["model"], "--data", tiny_world["pairs"], "--out", str(out), "--batch-size", "4",
            "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", flag])
        policy = load_model(tiny_world["model"], dtype=torch.float32)
        start = {n: p.detach().clone() for n, p in policy.named_parameters()}
        examples = train_policy.encode_examples(tok, pairs, args)
        train_policy.add_reference_logps(policy, examples, 4, CPU, bf16=args.bf16)
        train_policy.train(policy, examples, args, train_policy.objective_of(args), log=lambda msg: None)
        losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
        results[flag] = losses, {n: p.detach() - start[n] for n, p in policy.named_parameters()}

    (losses, update), (losses32, update32) = results["--bf16"], results["--no-bf16"]
    assert losses == pytest.approx(losses32, abs=2e-2)
    delta = torch.cat([(update[n] - update32[n]).flatten() for n in update])
    full = torch.cat([u.flatten() for u in update32.values()])
    assert 0 < delta.norm() <= 0.15 * full.norm()


def test_a_script_ends_without_the_teardown_that_aborted_beside_pyarrow(tmp_path, monkeypatch, capsys):
    """run_script(standalone=True), as each script's __main__ calls it, ends the process with os._exit and the
    run's status (1 after the one line, 0 after a clean run); then a parquet file with a missing key, given to
    train_weak.py, exits 1 with its line every time (it aborted with 134 in about 1 run of 6 from pyarrow's
    threads at interpreter teardown)."""
    import os
    import subprocess
    import sys
    ended = []

    def fake_exit(status):
        ended.append(status)
        raise RuntimeError("ended")
    monkeypatch.setattr(runs.os, "_exit", fake_exit)

    def bad(args):
        raise ValueError("a.jsonl, line 3: missing key 'chosen'")
    for main, status in ((bad, 1), (lambda args: None, 0)):
        with pytest.raises(RuntimeError, match="ended"):
            runs.run_script(main, None, standalone=True)
        assert ended.pop() == status
    assert capsys.readouterr().err == "error: a.jsonl, line 3: missing key 'chosen'\n"

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet
    pyarrow.parquet.write_table(pa.table({"prompt": ["p"] * 3, "chosen": ["a"] * 3}), str(tmp_path / "m.parquet"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(4):
        done = subprocess.run([sys.executable, os.path.join(root, "train_weak.py"), "--model", str(tmp_path / "m"),
                               "--data", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        assert done.returncode == 1 and "m.parquet, row 1: cannot tell the format" in done.stderr, done
