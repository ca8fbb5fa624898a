"""Attention over each example's span of the packed row (model.Attention on CPU), fwd + bwd, in the two ways
a bf16 step can run it: SDPA's CPU kernel in bf16, or in fp32 between two casts (measured and dropped:
docs/bench-cpu.md). Real HH-RLHF batches (8 pairs, 256 + 128), SmolLM2-135M's heads (9 over 3 KV heads,
head 64), one layer; the two ways in turn (ABAB).

    python bench/bench_span_attention.py --tokenizer models/smollm2-135m --batches 3 --rounds 8

Printed: the span lengths of each batch, then per round the ms of one layer's attention in each way.
"""
import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def span_attention(q, k, v, masks, fp32):
    """q [1, H, T, hd], k / v [1, Hkv, T, hd] (bf16), masks one additive [L, L] a span -> [1, H, T, hd]."""
    import torch
    import torch.nn.functional as F
    sizes = [m.shape[0] for m in masks]
    ys = []
    for qs, ks, vs, m in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), masks):
        if fp32:
            y = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=m.float(),
                                               enable_gqa=True).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m.to(q.dtype), enable_gqa=True)
        ys.append(y)
    return torch.cat(ys, 2)


def main(args):
    import torch
    sys.path.insert(0, REPO_ROOT)
    import data
    import formats
    from model import GPT, Config
    torch.set_num_threads(args.threads)
    tok = formats.load_tokenizer(args.tokenizer)
    pairs = random.Random(args.seed).sample(formats.load_pairs(args.data), 8 * args.batches)
    examples = [dict(data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], 256, 128), weight=1.0)
                for p in pairs]
    cfg = Config(model_type="llama", vocab_size=64, d_model=576, n_layer=1, n_head=9, n_kv_head=3, head_dim=64,
                 d_ff=64, max_pos=2048, act="silu", norm_eps=1e-6)
    model = GPT(cfg)
    cases = []
    for b in range(args.batches):
        batch = data.collate(examples[b * 8:(b + 1) * 8])
        ids = batch["input_ids"]
        _, masks = model.packed_mask(ids, batch, torch.float32)
        T = ids.shape[1]
        # heads second by a view, as model.Attention lays q, k, v out
        qkv = [torch.randn(1, T, h, 64, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for h in (9, 3, 3)]
        cases.append((qkv, masks, torch.randn(1, 9, T, 64, dtype=torch.bfloat16)))
        print(f"batch {b + 1}: {T} tokens, spans {[m.shape[0] for m in masks]}")

    def run(fp32):
        t0 = time.perf_counter()
        for qkv, masks, dy in cases:
            span_attention(*qkv, masks, fp32).backward(dy)
        return (time.perf_counter() - t0) * 1e3 / len(cases)

    for fp32 in (False, True):  # warm
        run(fp32)
    times = {False: [], True: []}
    for r in range(args.rounds):
        for fp32 in (False, True):
            times[fp32].append(run(fp32))
        print(f"round {r + 1}: bf16 SDPA {times[False][-1]:.1f} ms, fp32 SDPA {times[True][-1]:.1f} ms, "
              f"ratio {times[False][-1] / times[True][-1]:.2f}x")
    ratios = sorted(a / b for a, b in zip(times[False], times[True]))
    print(f"median ms a batch: bf16 {statistics.median(times[False]):.1f}, fp32 {statistics.median(times[True]):.1f};"
          f" bf16 / fp32 median {statistics.median(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    p.add_argument("--tokenizer", default=os.path.join(REPO_ROOT, "models", "smollm2-135m"))
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
