"""Tests of cwpo.py against independent naive formulas (full log_softmax + gather, finite differences).

Parity with TRL's trainers lives in tests/test_cwpo_trl.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cwpo


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
