"""Benchmark: peak memory of a few training steps at Qwen2.5-0.5B's shape, measured against
runs.memory_estimate (issue 14), in three variants, each a fresh process (or two):

    python bench/bench_memory.py                 # full, LoRA r 16 on all modules, FSDP2 over 2 gloo processes
    python bench/bench_memory.py --repeats 2 --steps 3 --seq 32
    python bench/bench_memory.py --table         # the README table: the paper's students on 80 GB GPUs
    python bench/bench_memory.py --saved         # what one SmolLM2-135M block keeps for backward, fp32 / bf16

The checkpoint: random weights (model.GPT.init_weights) in Qwen2.5-0.5B's config (494M parameters, tied
embeddings, V = 151,936), saved with model.save_model and loaded by train_policy.py as any checkpoint; a small
tokenizer over random text (token ids stay below V, which is all the shape needs). Each variant runs
train_policy.main on --pairs DPO pairs of --seq prompt and --seq answer tokens, batch --batch pairs, --steps steps,
fp32 on CPU, gradient checkpointing on (the default). The final save is skipped (not part of training).

Measured: the peak of RssAnon (/proc/self/status: anonymous resident memory, i.e. the heap and anonymous
mappings where tensors live; file-backed pages such as libraries and mapped files are left out), sampled every
2 ms by a thread during train_policy.train (the optimizer's state is created there), minus RssAnon before the
model was loaded (the Python and torch runtime). So it holds the weights, gradients, AdamW state, FSDP's
gathered groups and the activations, as the estimate (runs.memory_estimate, from the same flags) does.
Every variant runs with MALLOC_MMAP_THRESHOLD_=1048576: glibc then hands each freed block of 1 MiB or more back
to the OS at once. With its default, freed blocks below 32 MiB stay in the heap and RssAnon counts them as if
alive; FSDP gathers and frees block-sized tensors at every step, so an FSDP rank would carry about 0.7 GiB of
freed memory (the single process, which frees little, about 0.07 GiB). Variants are run in turn
(A B C A B C ... with --repeats), and the spread (max - min) over repeats is printed.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                hidden_act="silu")
STUDENTS = {  # the paper's students, from their public config.json files
    "OPT-1.3B": dict(model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                       tie_word_embeddings=False),
    "OPT-13B": dict(model_type="opt", vocab_size=50272, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                    ffn_dim=20480, max_position_embeddings=2048, word_embed_proj_dim=5120),
    "Qwen2.5-14B": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, intermediate_size=13824,
                        tie_word_embeddings=False),
}
ALL_MODULES = ("qkv", "o", "gate", "up", "down")
GIB = 2 ** 30

CHILD = """import json, os, sys, threading, time
sys.path.insert(0, {root!r})
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import torch, train_policy
base, peak, running = rss_anon(), [0], [False]
def sample():
    while True:
        if running[0]:
            peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
real_train = train_policy.train
def train(*a, **k):
    running[0] = True
    try:
        return real_train(*a, **k)
    finally:
        running[0] = False
        rank = int(os.environ.get("RANK", 0))
        json.dump({{"rank": rank, "peak": peak[0] - base}}, open(os.path.join({out!r}, f"mem{{rank}}.json"), "w"))
train_policy.train = train
train_policy.save_model = lambda *a, **k: None  # the final save is not training
train_policy.main(train_policy.parser().parse_args(sys.argv[1:]))
"""


def build(folder, args):
    """The random Qwen2.5-0.5B-shaped checkpoint, a tokenizer and the pairs file."""
    import torch
    import world
    from model import GPT, config_from_hf, save_model
    rng = random.Random(0)
    words = ["w%d" % i for i in range(300)]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    pairs = [{"prompt": text(2 * args.seq), "chosen": text(2 * args.seq), "rejected": text(2 * args.seq)}
             for _ in range(args.pairs)]
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    model_dir = os.path.join(folder, "model")
    tok = world.train_tokenizer([p["prompt"] for p in pairs], 1000, model_dir)
    torch.manual_seed(0)
    hf = dict(QWEN_05B, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_model(GPT(config_from_hf(hf)).init_weights(), model_dir)
    return model_dir, os.path.join(folder, "pairs.jsonl")


def variants(has_lora):
    """name -> (extra flags, ranks)."""
    found = {"full": ([], 1), "fsdp2": ([], 2)}
    if has_lora:
        found["lora"] = (["--lora-rank", "16", "--lora-modules", ",".join(ALL_MODULES)], 1)
    return found


def train_flags(model_dir, pairs, args, flags):
    """train_policy.py's flags for one variant (the estimate reads the same)."""
    return ["--model", model_dir, "--data", pairs, "--max-steps", str(args.steps), "--batch-size", str(args.batch),
            "--max-prompt-len", str(args.seq), "--max-answer-len", str(args.seq), "--warmup-steps", "1",
            "--log-every", "1", *flags]


def measure(name, argv, ranks, folder, i):
    out = os.path.join(folder, f"{name}-{i}")
    os.makedirs(out)
    child = os.path.join(folder, "child.py")
    with open(child, "w") as f:
        f.write(CHILD.format(root=ROOT, out=out))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else [])
    cmd += [child, *argv, "--out", out]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)),
               MALLOC_MMAP_THRESHOLD_="1048576")  # freed tensors leave RssAnon at once (see the docstring)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: failed\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return max(json.load(open(os.path.join(out, f"mem{r}.json")))["peak"] for r in range(ranks))


def table():
    """What fits on 80 GB GPUs, from runs.memory_estimate: 4 pairs of 256 + 256 tokens a GPU a micro-batch
    (--batch-size 32, --grad-accum 8 on one GPU, 1 on eight), bf16 autocast, gradient checkpointing, bf16 LoRA base."""
    import torch
    import runs
    import train_policy
    from model import config_from_hf
    rows = ["| student | parameters | full, 1 GPU | LoRA r 16 all modules, 1 GPU | FSDP2 full, 8 GPUs (per GPU) "
            "| FSDP2 + LoRA, 8 GPUs (per GPU) |", "|---|---|---|---|---|---|"]
    for name, hf in STUDENTS.items():
        cfg = config_from_hf(hf)
        cells = []
        for ranks, lora in ((1, []), (1, ["--lora-rank", "16"]), (8, []), (8, ["--lora-rank", "16"])):
            flags = ["--model", "m", "--data", "d", "--out", "o", "--batch-size", "32", "--grad-accum", str(8 // ranks)]
            est = runs.memory_estimate(cfg, train_policy.parser().parse_args(flags + lora), ranks,
                                               torch.device("cuda"))
            cells.append(f"{est['total'] / 1e9:.1f} GB {'fits' if est['total'] <= 75e9 else 'no'}")
        rows.append(f"| {name} | {est['parameters'] / 1e9:.2f}B | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    print("fits: at most 75 GB of the 80, leaving 5 GB for the CUDA context and the caching allocator's slack")


SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=1, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192, hidden_act="silu",
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def saved(spans=4, span=128):
    """The tensors one block of SmolLM2-135M's shape keeps for backward (saved-tensor hooks, each storage once), in
    fp32 and under CPU bf16 autocast, on a packed row of `spans` causal spans of `span` tokens (the CPU layout: one
    mask a span). Activations in bytes a token; the casts of weights that autograd keeps (autocast's bf16 copies) in
    bytes a block, apart. Counted, not timed: a CPU without bf16 runs it too (slowly)."""
    import torch
    import model
    cfg = model.config_from_hf(SMOLLM2_135M)
    block, tokens = model.Block(cfg), spans * span
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    weight_shapes = {tuple(p.shape) for p in block.parameters() if p.dim() == 2}
    pos = torch.arange(span).repeat(spans)[None]  # [1, T]
    for dtype in (torch.float32, torch.bfloat16):
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
            return t
        mask = [torch.full((span, span), float("-inf")).triu(1).to(dtype)] * spans  # one tensor, counted once
        x = torch.randn(1, tokens, cfg.d_model, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                block(x, model.rope_cos_sin(cfg, pos, dtype), mask)
        weights = sum(n for shape, n in kept.values() if shape in weight_shapes)
        acts = sum(n for shape, n in kept.values()) - weights
        print(f"{str(dtype):15} activations {acts / tokens:8.0f} B a token, weight copies {weights / 2**20:6.2f} MiB "
              f"a block ({len(kept)} tensors)")


def main(args):
    if args.table:
        return table()
    if args.saved:
        return saved()
    import runs
    import train_policy
    from model import config_from_hf
    has_lora = "--lora-rank" in train_policy.parser().format_help()
    if not has_lora:
        print("LoRA variant skipped: train_policy.py has no --lora-rank yet (branch lora not merged)")
    cfg = config_from_hf(QWEN_05B)
    with tempfile.TemporaryDirectory() as folder:
        model_dir, pairs = build(folder, args)
        found = {k: (train_flags(model_dir, pairs, args, flags), ranks)
                 for k, (flags, ranks) in variants(has_lora).items() if k in args.only.split(",")}
        measured = {}
        for i in range(args.repeats):  # variants in turn, repeated
            for name, (argv, ranks) in found.items():
                measured.setdefault(name, []).append(measure(name, argv, ranks, folder, i))
                print(f"  repeat {i + 1} {name}: {measured[name][-1] / GIB:.2f} GiB", flush=True)
        estimates = {name: runs.memory_estimate(cfg, train_policy.parser().parse_args(argv + ["--out", "x"]),
                                                        ranks) for name, (argv, ranks) in found.items()}
    print(f"Qwen2.5-0.5B shape, {args.steps} steps, batch {args.batch} pairs of {args.seq} + {args.seq} tokens, "
          f"fp32 CPU; peak RssAnon during train() minus the runtime's, per rank; median of {args.repeats}")
    print(f"{'variant':8} {'measured GiB':>14} {'spread':>8} {'estimate GiB':>13} {'est/meas':>9} {'vs full':>8}")
    full = statistics.median(measured["full"]) if "full" in measured else float("nan")
    for name, est in estimates.items():
        mid = statistics.median(measured[name])
        spread = max(measured[name]) - min(measured[name])
        print(f"{name:8} {mid / GIB:14.2f} {spread / GIB:8.2f} {est['total'] / GIB:13.2f} {est['total'] / mid:9.2f} "
              f"{mid / full:8.3f}")
    print("estimate, GiB: " + "; ".join(f"{name} " + " + ".join(f"{k} {v / GIB:.2f}" for k, v in list(est.items())[:5])
                                        for name, est in estimates.items()))


def count(text):
    """A count >= 1 (--repeats 0 would take the median of nothing)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=count, default=3)
    p.add_argument("--batch", type=count, default=2, help="pairs per step")
    p.add_argument("--seq", type=count, default=32, help="prompt tokens and answer tokens (each at most)")
    p.add_argument("--pairs", type=count, default=8)
    p.add_argument("--repeats", type=count, default=1)
    p.add_argument("--only", default="full,lora,fsdp2", help="a comma list of the variants to run")
    p.add_argument("--table", action="store_true", help="print the README table of the paper's students and stop")
    p.add_argument("--saved", action="store_true", help="print what one SmolLM2-135M block saves for backward and stop")
    main(p.parse_args())
