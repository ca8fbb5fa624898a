"""Confidence-Weighted Preference Optimization (CW-PO): log-probs, confidence and every pairwise loss.

Everything here is a pure function of tensors (or a torch.autograd.Function) and imports only torch,
so each piece can be copied alone. Paper: "When Weak LLMs Speak with Confidence, Preference Alignment
Gets Stronger" (Afzali, Jeon, Brbic; ICLR 2026; arXiv 2603.04968). Loss definitions follow TRL 1.16's
DPOTrainer, CPOTrainer and ORPOTrainer, and are tested against them in tests/test_cwpo_trl.py.

Batch layout (data.py's collate): input_ids / attention_mask / completion_mask [2B, T], rows 0..B-1
prompt+chosen and rows B..2B-1 prompt+rejected, right-padded; weight [B] the per-pair weight.
"""

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target id < 0 marks a position that is not scored (log-prob 0, gradient 0)
# Rows of logits per chunk: [256, V] fp32 is 156 MB at V = 151,936, and M = 256 keeps the GEMMs efficient.
DEFAULT_CHUNK_SIZE = 256

# ----------------------------------------------------------------------------------------------------
# Fused LM head + log-softmax + gather, chunked over tokens


def _acc_dtype(dtype):
    """Accumulation dtype: fp64 for fp64 inputs (exact tests), else fp32 (also for bf16 / fp16 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden, weight, bias):
    """Logits [n, V] of one chunk of hidden states [n, d] in the accumulation dtype (matmul in the inputs' dtype,
    as HF does; CPU has no bf16 x bf16 -> fp32 GEMM output)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits += bias
    return logits.to(_acc_dtype(logits.dtype))


class FusedLogProbs(torch.autograd.Function):
    """logps[i] = log softmax(hidden[i] @ weight.T + bias)[targets[i]], never holding more than [chunk_size, V] logits.

    The naive version materializes logits [N, V], log-softmax [N, V] and their gradient [N, V] (at V = 151,936
    and N = 4,096 that is 2.5 GB each in fp32). Here forward keeps, per row, only the logsumexp; backward
    recomputes each chunk's logits and turns them in place into d logp / d logits = grad * (onehot - softmax),
    then accumulates grad_hidden = dlogits @ W, grad_weight += dlogits.T @ hidden (fp32 accumulators, also for
    bf16/fp16 inputs; grads are returned in the inputs' dtype). Rows with targets < 0 give 0 and get 0 gradient.
    Inputs: hidden [N, d], weight [V, d], bias [V] or None, targets [N] long, chunk_size int.
    Output: [N] fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n_rows = hidden.shape[0]
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        acc = _acc_dtype(hidden.dtype)
        lse = torch.empty(n_rows, dtype=acc, device=hidden.device)  # log sum_v exp(logit_v) per row
        target_logits = torch.empty(n_rows, dtype=acc, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            logits = _chunk_logits(hidden[start:end], weight, bias)  # [n, V]
            target_logits[start:end] = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            row_max = logits.amax(dim=1)
            # logsumexp in place: no second [n, V] temporary
            lse[start:end] = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return (target_logits - lse).masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows, chunk_size = hidden.shape[0], ctx.chunk_size
        acc = lse.dtype
        grad = grad_logps.to(acc) * (targets >= 0)  # [N]; ignored rows get no gradient
        safe_targets = targets.clamp(min=0)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            g = grad[start:end, None]  # [n, 1]
            # dlogits = g * (onehot - softmax), built in place in the recomputed logits buffer
            dlogits = _chunk_logits(hidden[start:end], weight, bias).sub_(lse[start:end, None]).exp_().mul_(-g)
            dlogits.scatter_add_(1, safe_targets[start:end, None], g)
            if need_hidden:  # each row is written once: one GEMM (fp32 accumulation inside) per chunk
                torch.mm(dlogits.to(weight.dtype), weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(dlogits.t(), hidden[start:end].to(acc))
            if need_bias:
                grad_bias += dlogits.sum(dim=0)
            del dlogits
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def token_logps(hidden, weight, targets, bias=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """Per-token log p(targets | hidden) [N] fp32 (fp64 for fp64 inputs) via FusedLogProbs; targets < 0 give 0."""
    return FusedLogProbs.apply(hidden, weight, bias, targets, chunk_size)
