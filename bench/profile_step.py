"""Where a DPO step of ours spends its time, by kind of kernel (issue 15): real HH-RLHF batches through the
SmolLM2-135M shape (random weights), each batch stepped until warm, then one step under torch.profiler.

    python bench/profile_step.py --data data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer models/smollm2-135m
    python bench/profile_step.py --tokenizer models/smollm2-135m --bf16 --top 15      # under bf16 autocast (issue 25)

Printed per batch: the step's time unprofiled, then the profiler's self time by kind: GEMMs (aten::mm / addmm:
every linear layer and the LM head), attention (SDPA's CPU flash kernel, forward and backward), the optimizer,
and the rest (norms, RoPE, SwiGLU, copies, the loss). The GEMM share bounds what any change that keeps the same
GEMMs can gain: with everything else free, the step would take the GEMM time alone. Same settings as
bench_dpo_step.py's HH run: 8 pairs a step, 256 + 128 truncation, fp32, no gradient checkpointing, 2 threads.
"""
import argparse
import os
import random
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
       "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
KINDS = {"aten::mm": "GEMM", "aten::addmm": "GEMM", "aten::addmm_": "GEMM", "aten::bmm": "GEMM",
         "aten::_fused_adamw_": "optimizer"}


def kind(name):
    return "attention" if "scaled_dot_product" in name else KINDS.get(name, "rest")


def main(args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, REPO_ROOT)
    import cwpo
    import data
    import formats
    from formats import load_tokenizer
    from model import GPT, Config
    from runs import require_cpu_bf16
    if args.bf16:
        require_cpu_bf16("--bf16")

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    pairs = random.Random(args.seed).sample(formats.load_pairs(args.data), args.pairs * args.batches)
    examples = [dict(data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], 256, 128), weight=1.0)
                for p in pairs]
    cfg = Config(model_type="llama", vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64,
                 d_ff=1536, max_pos=2048, act="silu", norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = GPT(cfg).init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    ref = torch.full((args.pairs,), -50.0)  # any fixed reference: the cost does not depend on it

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):  # as train_policy.train under --bf16
            loss, _ = cwpo.batch_loss(model, data.collate(batch), ref, ref, loss_type="sigmoid", beta=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    totals = {}
    for b in range(args.batches):
        batch = examples[b * args.pairs:(b + 1) * args.pairs]
        for _ in range(args.warmup):
            step(batch)
        t0 = time.perf_counter()
        step(batch)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
        by_kind = {}
        for event in prof.key_averages():
            by_kind[kind(event.key)] = by_kind.get(kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
        for k, v in by_kind.items():
            totals[k] = totals.get(k, 0.0) + v
        shares = ", ".join(f"{k} {v / sum(by_kind.values()):.1%}" for k, v in sorted(by_kind.items()))
        if args.top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        tokens = sum(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in batch)
        print(f"batch {b + 1}: {tokens} tokens, step {wall:.2f} s unprofiled; profiled {sum(by_kind.values()):.2f} s: "
              f"{shares}", flush=True)
    shares = ", ".join(f"{k} {v / sum(totals.values()):.1%}" for k, v in sorted(totals.items()))
    print(f"all batches: {shares}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    p.add_argument("--tokenizer", default=os.path.join(REPO_ROOT, "models", "smollm2-135m"))
    p.add_argument("--pairs", type=int, default=8, help="pairs a step")
    p.add_argument("--batches", type=int, default=3, help="batches, each profiled once")
    p.add_argument("--warmup", type=int, default=2, help="steps on each batch before its profiled step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="the step under CPU bf16 autocast (fp32 master weights)")
    p.add_argument("--top", type=int, default=0, help="also print the profiler's N largest operators by self time")
    args = p.parse_args()
    if any(os.environ.get(k) != v for k, v in ENV.items()):  # before torch is imported: rerun with the pinned env
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENV})
    main(args)
