"""Tests of cwpo.py against independent naive formulas (full log_softmax + gather, finite differences).

Parity with TRL's trainers lives in tests/test_cwpo_trl.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cwpo
import data


def naive_token_logps(hidden, weight, targets, bias=None):
    """The reference: full logits [N, V], log_softmax, gather; ignored rows (target < 0) give 0."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return logps * (targets >= 0)


def make_inputs(n, d, vocab, dtype, bias=True, seed=0, n_ignored=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:n_ignored]] = cwpo.IGNORE_INDEX
    return hidden, weight, b, targets


def values_and_grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None)
    out.backward(upstream)
    return out.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------------
# Fused log-prob kernel


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])  # 37 rows: chunks that do not divide N, and one chunk
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_fp64_matches_naive(chunk_size, bias):
    hidden, weight, b, targets = make_inputs(37, 12, 50, torch.float64, bias=bias, n_ignored=5)
    upstream = torch.randn(37, dtype=torch.float64)
    kernel = lambda h, w, t, bb: cwpo.token_logps(h, w, t, bb, chunk_size=chunk_size)  # noqa: E731
    ours = values_and_grads(kernel, hidden, weight, b, targets, upstream)
    ref = values_and_grads(naive_token_logps, hidden, weight, b, targets, upstream)
    assert ours[0].dtype == torch.float64
    for x_ours, x_ref in zip([ours[0]] + ours[1], [ref[0]] + ref[1]):
        assert x_ours.dtype == torch.float64
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [5, 256])
def test_kernel_fp32_matches_naive(chunk_size):
    hidden, weight, b, targets = make_inputs(29, 16, 300, torch.float32, n_ignored=3, seed=1)
    upstream = torch.randn(29)
    kernel = lambda h, w, t, bb: cwpo.token_logps(h, w, t, bb, chunk_size=chunk_size)  # noqa: E731
    ours = values_and_grads(kernel, hidden, weight, b, targets, upstream)
    # Reference in fp64 on the same fp32 inputs
    ref = values_and_grads(naive_token_logps, hidden.double(), weight.double(), b.double(), targets, upstream.double())
    assert ours[0].dtype == torch.float32
    for x_ours, x_ref in zip([ours[0]] + ours[1], [ref[0]] + ref[1]):
        assert x_ours.dtype == torch.float32
        torch.testing.assert_close(x_ours.double(), x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_within_stated_tolerance(dtype):
    """bf16 / fp16 inputs: the logits GEMM runs in the inputs' dtype (as in HF), everything after it in fp32.

    Stated tolerance, against fp64 on the same (rounded) inputs, with logits up to ~13 in magnitude: log-probs
    within 0.08 (bf16) / 0.01 (fp16) absolute, i.e. about 2 ulp of the largest logit (measured: 0.041 / 0.0057),
    gradients within 2 % (bf16) / 0.2 % (fp16) relative Frobenius error (measured: 0.55 % / 0.064 %).
    """
    hidden, weight, b, targets = make_inputs(40, 32, 500, dtype, n_ignored=4, seed=2)
    upstream = torch.randn(40)
    kernel = lambda h, w, t, bb: cwpo.token_logps(h, w, t, bb, chunk_size=16)  # noqa: E731
    ours = values_and_grads(kernel, hidden, weight, b, targets, upstream)
    ref = values_and_grads(naive_token_logps, hidden.double(), weight.double(), b.double(), targets, upstream.double())
    assert ours[0].dtype == torch.float32
    value_tol, grad_tol = {torch.bfloat16: (0.08, 0.02), torch.float16: (0.01, 0.002)}[dtype]
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=0, atol=value_tol)
    for g_ours, g_ref in zip(ours[1], ref[1]):
        assert g_ours.dtype == dtype
        assert (g_ours.double() - g_ref).norm() / g_ref.norm() < grad_tol


def test_kernel_fully_masked_rows_and_batches():
    hidden, weight, b, targets = make_inputs(12, 8, 40, torch.float64, seed=3)
    targets[3:7] = cwpo.IGNORE_INDEX  # a run of ignored rows spanning a chunk boundary
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = cwpo.token_logps(h, w, targets, b, chunk_size=4)
    out.backward(torch.ones(12, dtype=torch.float64))
    assert (out[3:7] == 0).all() and (h.grad[3:7] == 0).all()
    assert (h.grad[:3] != 0).any() and (h.grad[7:] != 0).any()
    # Every row ignored: zeros and zero gradients everywhere (no NaN)
    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    out = cwpo.token_logps(h2, w2, torch.full((12,), cwpo.IGNORE_INDEX), b, chunk_size=5)
    out.sum().backward()
    assert (out == 0).all() and (h2.grad == 0).all() and (w2.grad == 0).all()
    # No rows at all (a batch without completion tokens)
    h3 = hidden[:0].clone().requires_grad_()
    out = cwpo.token_logps(h3, weight, targets[:0])
    out.sum().backward()
    assert out.shape == (0,) and h3.grad.shape == (0, 8)


def test_kernel_gradcheck():
    hidden, weight, b, targets = make_inputs(6, 4, 9, torch.float64, seed=4)
    targets[2] = cwpo.IGNORE_INDEX
    inputs = (hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), targets, 4)
    assert torch.autograd.gradcheck(cwpo.FusedLogProbs.apply, inputs, eps=1e-6, atol=1e-8)


def test_kernel_under_autocast_matches_bf16_naive():
    """Under CPU bf16 autocast the kernel casts its inputs like autocast's matmul does; fp32 weight grads."""
    hidden, weight, b, targets = make_inputs(24, 16, 100, torch.float32, seed=5)
    grads = []
    for fn in (lambda h, w: cwpo.token_logps(h, w, targets, chunk_size=7),
               lambda h, w: naive_token_logps(h, w, targets)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h, w)
        out.sum().backward()
        grads.append((out.detach(), h.grad, w.grad))
    assert grads[0][0].dtype == torch.float32 and grads[0][2].dtype == torch.float32
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------
# sequence_logps in the packed layout (data.collate) against today's two-row layout, written out here


def tiny_gpt(family, seed=0, dtype=torch.float64):
    """A random model.GPT of each position scheme: RoPE (llama), learned (gpt2), learned with OPT's offset 2."""
    from model import GPT, config_from_hf
    hf = {"llama": dict(model_type="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64),
          "gpt2": dict(model_type="gpt2", n_embd=16, n_layer=2, n_head=4, n_positions=64),
          "opt": dict(model_type="opt", hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=32,
                      max_position_embeddings=64)}[family]
    torch.manual_seed(seed)
    return GPT(config_from_hf(dict(hf, vocab_size=40))).init_weights(0.3).to(dtype)


# (prompt, chosen, rejected) lengths: ragged; a 24-token prompt (as --max-prompt-len 24 leaves it) longer than
# every other whole pair; one-token answers; short pairs that pack into one row beside each other
CASES = [(5, 3, 7), (24, 2, 4), (2, 1, 1), (3, 6, 1), (1, 2, 3), (4, 4, 4)]


def make_pairs(seed=0, cases=CASES):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 40, (n,), generator=gen).tolist()  # noqa: E731
    pairs = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in cases]
    pairs[0]["rejected_ids"][:2] = pairs[0]["chosen_ids"][:2]  # two answers sharing their first tokens
    return pairs


def two_row_logps(model, pairs, pad_id=0):
    """Today's layout: rows prompt + chosen, then prompt + rejected, right-padded; full logits, log_softmax, gather.
    -> per answer (chosen ones, then rejected ones) the log-prob of each answer token after the first prompt token."""
    rows = [(p["prompt_ids"], p[key]) for key in ("chosen_ids", "rejected_ids") for p in pairs]
    T = max(len(x) + len(y) for x, y in rows)
    ids = torch.tensor([x + y + [pad_id] * (T - len(x) - len(y)) for x, y in rows])
    attention = torch.tensor([[1] * (len(x) + len(y)) + [0] * (T - len(x) - len(y)) for x, y in rows])
    log_probs = model(ids, attention)[:, :-1].double().log_softmax(-1)
    return [log_probs[r, len(x) - 1 + torch.arange(len(y)), torch.tensor(y)] for r, (x, y) in enumerate(rows)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_packed_layout_matches_two_row_layout(family):
    model, pairs = tiny_gpt(family), make_pairs()
    batch = data.collate(pairs)
    assert batch["input_ids"].shape[0] == 1  # pairs of different lengths share the one row
    out = cwpo.sequence_logps(model, batch, chunk_size=5, ld_alpha=0.3, wpo=True)
    plain = cwpo.sequence_logps(model, batch)
    ref = two_row_logps(model, pairs)
    torch.testing.assert_close(plain["logps"], torch.stack([r.sum() for r in ref]), rtol=1e-10, atol=1e-10)
    assert out["n_tokens"].tolist() == [len(r) for r in ref]
    B = len(pairs)
    for a, r in enumerate(ref):  # LD-DPO: the first min(n+, n-) tokens at weight 1, the rest at ld_alpha
        shared = min(len(ref[a % B]), len(ref[a % B + B]))
        assert out["logps"][a].item() == pytest.approx((r[:shared].sum() + 0.3 * r[shared:].sum()).item(), rel=1e-10)
    grads = torch.autograd.grad(plain["logps"] @ torch.linspace(-1, 1, 2 * B, dtype=torch.float64),
                                list(model.parameters()))
    ref_grads = torch.autograd.grad(torch.stack([r.sum() for r in ref]) @ torch.linspace(-1, 1, 2 * B, dtype=torch.float64),
                                    list(model.parameters()))
    for g, r in zip(grads, ref_grads):  # model.RMSNorm computes in fp32: relative to the gradient's norm
        assert (g - r).norm() <= 1e-6 * r.norm()


def test_wpo_weights_match_naive():
    model, pairs = tiny_gpt("llama"), make_pairs()
    out = cwpo.sequence_logps(model, data.collate(pairs), wpo=True)
    for a, (p, key) in enumerate((p, key) for key in ("chosen_ids", "rejected_ids") for p in pairs):
        ids = torch.tensor(p["prompt_ids"] + p[key])[None]
        log_probs = model(ids)[0, len(p["prompt_ids"]) - 1:-1].log_softmax(-1)
        answer = log_probs.gather(1, ids[0, len(p["prompt_ids"]):, None])[:, 0]
        expected = torch.exp((answer - torch.logsumexp(2 * log_probs, -1)).mean())  # WPO: log sum_v p_v^2
        assert out["wpo_weights"][a].item() == pytest.approx(expected.item(), rel=1e-6)  # fp32 kernel


LOSS_OPTIONS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.2}}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_loss_and_gradient_matches_two_row_layout_fp32(family):
    """Every loss family of cwpo.LOSS_TYPES, its value and gradients, in fp32 to 1e-5: packed layout against
    the two-row layout's log-probs fed to preference_loss."""
    model, pairs = tiny_gpt(family, seed=1, dtype=torch.float32), make_pairs(seed=1)
    B = len(pairs)
    batch = data.collate([dict(p, weight=w) for p, w in zip(pairs, torch.linspace(0.2, 1.0, B).tolist())])
    ref_chosen, ref_rejected = -20 * torch.rand(B), -20 * torch.rand(B)
    for name in cwpo.LOSS_TYPES:
        weights = torch.ones(B) if name.startswith("aot") else batch["weight"]
        batch["weight"] = weights
        loss, _ = cwpo.batch_loss(model, batch, ref_chosen, ref_rejected, name, beta=0.3, **LOSS_OPTIONS.get(name, {}))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        ref = two_row_logps(model, pairs)
        logps, n = torch.stack([r.sum() for r in ref]).float(), torch.tensor([len(r) for r in ref])
        losses = cwpo.preference_loss(name, logps[:B], logps[B:], ref_chosen, ref_rejected, 0.3, n[:B], n[B:],
                                      **LOSS_OPTIONS.get(name, {}))
        expected = (weights * losses).mean()
        ref_grads = torch.autograd.grad(expected, list(model.parameters()))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5, msg=name)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= 1e-5 * r.norm() + 1e-7, name


def test_packed_layout_fields():
    """The layout the docstring draws: one row without padding, positions restart after the prompt for each answer,
    the first rejected token is predicted from the prompt's last position, last_index ends each answer."""
    pairs = make_pairs()
    batch = data.collate(pairs)
    T = batch["input_ids"].shape[1]
    flat = {k: batch[k].flatten() for k in ("input_ids", "position_ids", "segment_ids", "branch_ids")}
    assert batch["input_ids"].shape[0] == 1
    assert T == sum(len(p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]) for p in pairs)
    B = len(pairs)
    for i, p in enumerate(pairs):
        where = lambda branch: ((flat["segment_ids"] == i) & (flat["branch_ids"] == branch)).nonzero()[:, 0]  # noqa: E731
        prompt, chosen, rejected = where(0), where(1), where(2)
        for index, ids, first in ((prompt, p["prompt_ids"], 0), (chosen, p["chosen_ids"], len(p["prompt_ids"])),
                                  (rejected, p["rejected_ids"], len(p["prompt_ids"]))):
            assert flat["input_ids"][index].tolist() == ids
            assert flat["position_ids"][index].tolist() == list(range(first, first + len(ids)))
        for a, answer in ((i, chosen), (B + i, rejected)):
            scored = batch["score_answer"] == a
            assert batch["score_index"][scored].tolist() == [prompt[-1].item()] + answer[:-1].tolist()
            assert batch["score_target"][scored].tolist() == flat["input_ids"][answer].tolist()
            assert batch["last_index"][a] == answer[-1]


# ---------------------------------------------------------------------------------------------------
# Confidence, selection, Bradley-Terry, weighting


def test_confidence_is_rescaled_bt_probability():
    score_a, score_b = torch.tensor([2.0, -1.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, 0.5, -3.0])
    a_wins, c = cwpo.confidence(score_a, score_b)
    assert a_wins.tolist() == [True, False, True, True]
    for sa, sb, ci in zip(score_a.tolist(), score_b.tolist(), c.tolist()):
        p_label = 1 / (1 + math.exp(-abs(sa - sb)))  # BT probability of the weak label, in [0.5, 1)
        assert ci == pytest.approx(2 * (p_label - 0.5), abs=1e-7)
    assert c[2] == 0 and 0 <= c.min() and c.max() < 1


def test_top_fraction_mask():
    conf = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.0, 0.6, 0.4])
    assert cwpo.top_fraction_mask(conf, 0.3).tolist() == [0, 1, 0, 1, 0, 1, 0, 0, 0, 0]
    assert cwpo.top_fraction_mask(conf, 1.0).sum() == 10 and cwpo.top_fraction_mask(conf, 0.0).sum() == 0
    assert cwpo.top_fraction_mask(conf, 0.01).tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # at least one; ties: first
    with pytest.raises(ValueError, match="fraction"):
        cwpo.top_fraction_mask(conf, 1.5)


def test_bt_loss_matches_formula_and_finite_differences():
    chosen = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64)
    margin = torch.tensor([0.2, 0.0, -1.0], dtype=torch.float64)
    losses = cwpo.bt_loss(chosen, rejected, margin, center_coef=0.1)
    for i in range(3):
        d = chosen[i].item() - rejected[i].item() - margin[i].item()
        expected = math.log1p(math.exp(-d)) + 0.1 * (chosen[i].item() + rejected[i].item()) ** 2
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda c: cwpo.bt_loss(c, rejected, margin, 0.1), (chosen,))


def test_weighted_mean_and_learning_rate_scale():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    weights = torch.tensor([0.5, 0.5, 0.25, 0.75])
    assert cwpo.weighted_mean(losses, weights).item() == pytest.approx((0.5 + 1 + 0.75 + 3) / 4)
    assert cwpo.weighted_mean(losses, weights, "sum_w").item() == pytest.approx((0.5 + 1 + 0.75 + 3) / 2)
    # "mean" scales the gradient by mean(w) relative to "sum_w" (the learning-rate remark of the docstring)
    g_mean = torch.autograd.grad(cwpo.weighted_mean(losses, weights), losses)[0]
    g_sum_w = torch.autograd.grad(cwpo.weighted_mean(losses, weights, "sum_w"), losses)[0]
    torch.testing.assert_close(g_mean, weights.mean() * g_sum_w)
    assert cwpo.weighted_mean(losses, torch.zeros(4), "sum_w").item() == 0  # all-zero top-N batch: 0, not NaN
    with pytest.raises(ValueError, match="sum_w"):
        cwpo.weighted_mean(losses, weights, "median")


# ---------------------------------------------------------------------------------------------------
# Losses that TRL's DPOTrainer does not have, and errors


def pair_logps(seed=0, n=5):
    gen = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(4)]


def test_cdpo_is_conservative_dpo():
    """cDPO (the original DPO code's label_smoothing): -(1-e) log s(b d) - e log s(-b d), d the DPO margin."""
    chosen, rejected, ref_chosen, ref_rejected = pair_logps()
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    ours = cwpo.preference_loss("sigmoid", chosen, rejected, ref_chosen, ref_rejected, beta=0.3, cdpo=0.2)
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    expected = -0.8 * torch.log(sig(0.3 * delta)) - 0.2 * torch.log(sig(-0.3 * delta))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    plain = cwpo.preference_loss("sigmoid", chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    torch.testing.assert_close(plain, -torch.log(sig(0.3 * delta)), rtol=1e-12, atol=1e-12)


def test_reference_free_dpo_is_cpo_without_nll():
    chosen, rejected, _, _ = pair_logps(1)
    n = torch.tensor([3, 4, 5, 6, 7])
    free = cwpo.preference_loss("sigmoid", chosen, rejected, None, None, beta=0.5)
    cpo = cwpo.preference_loss("cpo", chosen, rejected, beta=0.5, chosen_n_tokens=n, rejected_n_tokens=n, cpo_alpha=0)
    torch.testing.assert_close(free, cpo)


def test_every_loss_type_runs_and_unknown_names_are_clear_errors():
    chosen, rejected, ref_chosen, ref_rejected = pair_logps(2)
    n = torch.tensor([3, 4, 5, 6, 7])
    for name in cwpo.LOSS_TYPES:
        losses = cwpo.preference_loss(name, chosen, rejected, ref_chosen, ref_rejected, label_smoothing=0.1,
                                      chosen_n_tokens=n, rejected_n_tokens=n)
        assert losses.shape == (5,) and torch.isfinite(losses).all(), name
    with pytest.raises(ValueError, match="known: sigmoid, hinge, ipo"):
        cwpo.preference_loss("dpo", chosen, rejected, ref_chosen, ref_rejected)
    with pytest.raises(ValueError, match="chosen_n_tokens"):
        cwpo.preference_loss("ipo", chosen, rejected, ref_chosen, ref_rejected)
    with pytest.raises(ValueError, match="only applies to"):
        cwpo.preference_loss("nca_pair", chosen, rejected, ref_chosen, ref_rejected, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="unknown f_divergence_type"):
        cwpo.preference_loss("sigmoid", chosen, rejected, ref_chosen, ref_rejected, f_divergence_type="kl")
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        cwpo.preference_loss("exo_pair", chosen, rejected, ref_chosen, ref_rejected)
    with pytest.raises(TypeError, match="label_smothing"):
        cwpo.preference_loss("robust", chosen, rejected, ref_chosen, ref_rejected, label_smothing=0.1)


def test_batch_loss_weights_and_errors():
    lm, pairs = tiny_gpt("llama", seed=2, dtype=torch.float32), make_pairs(seed=2, cases=[(3, 4, 1), (2, 5, 2)])
    batch = data.collate([dict(p, weight=w) for p, w in zip(pairs, [0.3, 0.9])])
    ref_chosen, ref_rejected = torch.tensor([-9.0, -12.0]), torch.tensor([-6.0, -3.0])
    loss, metrics = cwpo.batch_loss(lm, batch, ref_chosen, ref_rejected, beta=0.5)
    with torch.no_grad():
        logps = torch.stack([r.sum() for r in two_row_logps(lm, pairs)]).float()
        delta = (logps[:2] - ref_chosen) - (logps[2:] - ref_rejected)
        expected = (batch["weight"] * -F.logsigmoid(0.5 * delta)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["margin"] == pytest.approx(0.5 * delta.mean().item(), rel=1e-5)
    assert metrics["accuracy"] == (delta > 0).float().mean().item()
    with pytest.raises(ValueError, match="loss_weights"):
        cwpo.batch_loss(lm, batch, ref_chosen, ref_rejected, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="aot"):
        cwpo.batch_loss(lm, batch, ref_chosen, ref_rejected, loss_type="aot", use_weighting=True)


# --- issue 10: weights, gradients, autocast


@pytest.mark.parametrize("seed", [5, 6])
def test_kernel_under_autocast_computes_logits_in_bf16(seed):
    """Under CPU bf16 autocast the logits are the bf16 GEMM of bf16-rounded inputs, the rest fp32: the log-probs
    equal a naive computation on bf16 inputs to within fp32 rounding (measured <= 1e-6), while the same kernel in
    fp32 (the autocast cast forgotten) is 1e-2 away (measured 0.009 to 0.021), which the 2e-2 tolerance of
    test_kernel_under_autocast_matches_bf16_naive cannot tell."""
    hidden, weight, b, targets = make_inputs(24, 16, 100, torch.float32, seed=seed, n_ignored=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cwpo.token_logps(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, b,
                                chunk_size=7)
    assert ours.dtype == torch.float32
    naive_bf16 = naive_token_logps(hidden.bfloat16(), weight.bfloat16(), targets, b.bfloat16())
    naive_fp32 = naive_token_logps(hidden.double(), weight.double(), targets, b.double()).float()
    assert (naive_bf16 - naive_fp32).abs().max() > 5e-3  # the check below can tell bf16 from fp32 logits
    torch.testing.assert_close(ours, naive_bf16, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fraction, n, keep", [
    (0.3, 5, 2),     # 1.5: round half up 2, floor 1
    (0.25, 10, 3),   # 2.5: round half up 3, floor 2, banker's rounding 2
    (0.45, 10, 5),   # 4.5: round half up 5, banker's rounding 4
    (0.33, 7, 2),    # 2.31: round 2, ceil 3
    (0.6, 7, 4),     # 4.2: round 4, ceil 5
    (0.1, 4, 1),     # 0.4: round 0, but at least one pair when fraction > 0
])
def test_top_fraction_mask_rounds_half_up(fraction, n, keep):
    """The documented rule: round(fraction * B) with halves rounded up, at least one when fraction > 0; the kept
    pairs are the most confident ones."""
    conf = torch.rand(n, generator=torch.Generator().manual_seed(n))
    mask = cwpo.top_fraction_mask(conf, fraction)
    assert mask.sum().item() == keep
    assert mask.tolist() == [float(i in conf.argsort(descending=True)[:keep].tolist()) for i in range(n)]
