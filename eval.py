"""Gold Reward Accuracy of a checkpoint, and the main command: the built-in experiment (world.py).

    python eval.py                 # 5 seeds, every method; --quick: a smaller run; --sweep: 10 / 20 / 30 %
    python eval.py --policy runs/cw-dpo --sft runs/sft --prompts test.jsonl --judge rm/ --out gra/
    python eval.py --answers gra/answers.jsonl --judge rm2/ --out gra2/   # rescored, not generated

GRA (arXiv 2603.04968, Gold Reward Accuracy): for held-out prompts, a gold judge scores the aligned
policy's answer and the SFT model's answer; GRA is the % of prompts where the aligned answer scores
higher (ties count half; with --samples, a prompt's mean score). In the built-in world the judge is
a program (world.gold_reward); here a reward checkpoint (judges.py), and --out keeps every answer.
"""
import os

# OpenMP threads that spin-wait make small CPU runs up to 3x slower and erratic: set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json

import numpy as np
import torch

import data
import formats
import judges
import runs
import world
from cwpo import win_rate
from generate import generate_answers
from model import config_from_hf, load_model
from formats import load_tokenizer
from runs import check_fits, read_json

def generate_records(args, device, score):
    """The --prompts file's first --eval-prompts distinct prompts, each with --samples answers of
    the policy and of the SFT model (greedy unless --temperature), each model reading its own
    tokens with its own tokenizer."""
    paths = {"policy": args.policy, "sft": args.sft}
    toks = {name: load_tokenizer(path, args.chat_template) for name, path in paths.items()}
    pairs = {p["prompt"]: p for p in formats.load_pairs(args.prompts, args.format)}
    records = [{k: pairs[t][k] for k in ("prompt", "messages") if k in pairs[t]}
               for t in sorted(pairs)[:args.eval_prompts]]
    print(formats.form(toks["policy"], records))
    prompt_ids = {name: [data.encode_prompt(tok, data.prompt_of(tok, r), args.max_prompt_len)
                         for r in records] for name, tok in toks.items()}

    # checked before generation (the KV cache too); the judge's again on the answers
    for name, path in paths.items():
        cfg_file = os.path.join(path, "config.json")
        longest = max(map(len, prompt_ids[name])) + args.max_new_tokens
        check_fits(path, config_from_hf(read_json(cfg_file), cfg_file), toks[name], longest,
                   "the prompts + --max-new-tokens", cache=True)
    score.check(records, args.max_new_tokens + 1)

    dtype = torch.bfloat16 if runs.bf16_enabled(args.bf16, device) else None  # bf16 weights
    for name, path in paths.items():
        model = load_model(path, dtype, device)
        answers = generate_answers(model, toks[name], prompt_ids[name] * args.samples,
                                   args.max_new_tokens, args.temperature, args.seed, top_p=args.top_p)
        for i, r in enumerate(records):  # sample j of prompt i is answers[j * P + i]
            r[name] = answers[i::len(records)]
    return records

def main(args):
    if not (args.policy or args.answers):
        return world.experiment(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = judges.read_answers(args.answers) if args.answers else None
    score = judges.load_judge(args, device)  # a judge it cannot read fails before generation
    records = records or generate_records(args, device, score)

    print(f"judge's {formats.form(score.tok, records)}")
    judges.score_records(score, records)

    result = win_rate([r["policy_score"] for r in records], [r["sft_score"] for r in records])
    result.update(prompts=len(records), **{f"mean_{name}_score": float(np.mean(
        [r[f"{name}_score"] for r in records])) for name in ("policy", "sft")})
    result["settings"] = {k: v for k, v in vars(args).items() if k in judges.SETTINGS}
    if args.out:
        judges.write_results(args.out, records, result)
    print(json.dumps(result))

def parse_args(argv=None):
    """The flags, checked before any work: an explicit flag wins over --quick, --policy needs its
    three partners, --answers only --judge; the defaults of GRA and of the built-in experiment."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    world.add_args(p)  # the built-in experiment's flags
    p.add_argument("--eval-prompts", type=runs.positive_int,
                   help="prompts (GRA: 500, as the paper; built-in experiment: 300, --quick: 100)")
    p.add_argument("--policy", help="GRA of this checkpoint against --sft, judged by --judge")
    p.add_argument("--sft")
    p.add_argument("--prompts", help="a pairs file whose prompts are evaluated")
    p.add_argument("--format", default="auto", help="its format (formats.py; hh-chat: as turns)")
    p.add_argument("--judge", help="gold reward checkpoint folder (with its trained score.weight), "
                   "or any transformers sequence classifier (a DeBERTa-v3 reward model)")
    p.add_argument("--answers", help="rescore the answers.jsonl of an earlier run with --judge")
    p.add_argument("--max-prompt-len", type=runs.positive_int, default=256)
    p.add_argument("--max-new-tokens", type=runs.positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="of the sampled answers")
    p.add_argument("--bf16", action="store_true", help="generate with bf16 weights")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="render conversational prompts with each checkpoint's chat template")

    quick = p.parse_known_args(argv)[0].quick
    args = p.parse_args(argv, argparse.Namespace(**world.QUICK) if quick else None)
    judges.check_flags(p, args)
    return args

if __name__ == "__main__":
    runs.run_script(main, parse_args(), standalone=True)
