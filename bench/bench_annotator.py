"""Benchmark: the weak annotator on real HH-RLHF pairs, this checkout against another (the code before the packed
layout), each in a fresh process, interleaved (ABAB) and repeated (issue 15).

    git worktree add /tmp/old 14e8137     # the code before the packed layout
    python bench/bench_annotator.py --old /tmp/old --model models/smollm2-135m --rounds 2
    python bench/bench_annotator.py --dtypes --model models/smollm2-135m --rounds 3 --train-steps 2   # fp32 vs bf16

--dtypes compares this checkout with itself, --no-bf16 (fp32) against --bf16 (bf16 autocast over fp32 weights,
on a CPU with native bf16; issue 25), scoring and training alike.

Per variant and round: train_weak.score_pairs on --score-pairs pairs (a seeded sample of --data; the scoring pass
of train_weak.py, batch --batch-size, --max-prompt-len / --max-answer-len as the README's run: 8, 256 + 256),
and --train-steps optimizer steps of the README's annotator run through train_weak.train_annotator (BT loss,
batch 8, lr 1e-5, gradient checkpointing on, its default); the first step is left out of the mean. Printed:
pairs/s, s/step (steps/min), peak RSS, and the largest difference between the two checkouts' scores.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
       "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def child(args):
    """Runs inside --root's checkout: its train_weak, train_policy, data, model."""
    sys.path.insert(0, args._root)
    import torch
    import train_weak
    import formats
    from formats import load_tokenizer
    from model import load_model

    torch.set_num_threads(2)
    pairs = random.Random(0).sample(formats.load_pairs(args.data), args.score_pairs + 8 * args.train_steps)
    scored, labeled = pairs[:args.score_pairs], pairs[args.score_pairs:]
    work = tempfile.mkdtemp(prefix="bench_annotator.")
    opts = train_weak.parser().parse_args(
        ["--model", args.model, "--data", args.data, "--out", work, "--max-steps", str(args.train_steps),
         "--batch-size", str(args.batch_size), "--lr", "1e-5", "--log-every", "1", "--warmup-steps", "0",
         "--max-prompt-len", str(args.max_prompt_len), "--max-answer-len", str(args.max_answer_len)]
        + ([] if args._bf16 is None else ["--bf16" if args._bf16 else "--no-bf16"]))
    opts.log_every = 10**6  # score_pairs: no progress lines
    torch.manual_seed(0)  # the same fresh scalar head on both sides
    rm = load_model(args.model, dtype=torch.float32, reward=True)
    tok = load_tokenizer(args.model)
    start = time.perf_counter()
    a, b = train_weak.score_pairs(rm, tok, scored, opts, torch.device("cpu"), log=lambda *x: None)
    score_s = time.perf_counter() - start
    opts.log_every = 1
    train_weak.train_annotator(labeled, opts, torch.device("cpu"), log=lambda *x: None)
    with open(os.path.join(work, "log.jsonl")) as f:
        elapsed = [0.0] + [json.loads(line)["elapsed_s"] for line in f]
    steps = [y - x for x, y in zip(elapsed, elapsed[1:])][1:]
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print("RESULT " + json.dumps({"pairs_per_s": len(scored) / score_s, "score_s": score_s, "step_s": steps,
                                  "peak_rss_bytes": peak, "scores": a.tolist() + b.tolist()}), flush=True)


def main(args):
    sys.path.insert(0, REPO_ROOT)
    from runs import require_cpu_bf16
    variants = {"before (" + args.old + ")": (args.old, []), "after (this checkout)": (REPO_ROOT, [])}
    if args.dtypes:  # "before" is fp32, "after" bf16, both this checkout
        require_cpu_bf16("--dtypes")
        variants = {"fp32": (REPO_ROOT, ["--_bf16", "0"]), "bf16": (REPO_ROOT, ["--_bf16", "1"])}
    results = {name: [] for name in variants}
    print(f"annotator {args.model}: scoring {args.score_pairs} HH pairs, {args.train_steps} BT steps, batch "
          f"{args.batch_size}, {args.max_prompt_len} + {args.max_answer_len} tokens; env {ENV}; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for rnd in range(args.rounds):
        for name, (root, extra) in variants.items():
            argv = [sys.executable, os.path.abspath(__file__), "--_root", root] + sys.argv[1:] + extra
            proc = subprocess.run(argv, env={**os.environ, **ENV}, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(lines[-1][7:])
            results[name].append(r)
            print(f"  round {rnd + 1} {name}: {r['pairs_per_s']:.2f} pairs/s, "
                  f"{statistics.mean(r['step_s']) if r['step_s'] else float('nan'):.2f} s/step, "
                  f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    (before, old), (after, new) = results.items()
    diff = max(abs(x - y) for x, y in zip(old[0]["scores"], new[0]["scores"]))
    print(f"largest score difference before / after: {diff:.2e}")
    for name, runs in results.items():
        rate = [r["pairs_per_s"] for r in runs]
        step = [statistics.mean(r["step_s"]) for r in runs if r["step_s"]]
        print(f"{name}: scoring {statistics.median(rate):.2f} pairs/s (rounds {' '.join(f'{x:.2f}' for x in rate)}); "
              f"training {60 / statistics.median(step):.2f} steps/min, {statistics.median(step):.2f} s/step (rounds "
              f"{' '.join(f'{x:.2f}' for x in step)}); peak RSS {max(r['peak_rss_bytes'] for r in runs) / 1e9:.2f} GB")
    rate = lambda runs: statistics.median(r["pairs_per_s"] for r in runs)  # noqa: E731
    step = lambda runs: statistics.median(statistics.mean(r["step_s"]) for r in runs)  # noqa: E731
    goal = "goal 2x" if args.dtypes else "goal 2.5x"
    by_round = ", ".join(f"{b['pairs_per_s'] / a['pairs_per_s']:.2f}x" for a, b in zip(old, new))
    print(f"{after} / {before}: scoring {rate(new) / rate(old):.2f}x faster ({goal}; by round {by_round}), training "
          f"{step(old) / step(new):.2f}x faster")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="/tmp/old", help="checkout of the code to compare with")
    p.add_argument("--model", default=os.path.join(REPO_ROOT, "models", "smollm2-135m"))
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    p.add_argument("--score-pairs", type=int, default=96)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-answer-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtypes", action="store_true", help="this checkout fp32 (--no-bf16) against bf16 (--bf16)")
    p.add_argument("--_root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_bf16", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args._root else main(args)
