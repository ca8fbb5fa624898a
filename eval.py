"""Gold Reward Accuracy of a checkpoint, and the main command: the built-in experiment (world.py).

    python eval.py                 # 5 seeds, every method; --quick: a smaller run; --sweep: 10 / 20 / 30 % labels
    python eval.py --policy runs/cw-dpo --sft runs/sft --prompts heldout.jsonl --judge gold-rm/

GRA (arXiv 2603.04968, Gold Reward Accuracy): for held-out prompts, a gold judge scores the aligned policy's answer and
the SFT model's answer; GRA is the % of prompts where the aligned answer scores higher (ties count half).
In the built-in world the judge is a program (world.gold_reward); here a reward checkpoint.
"""
import os

# OpenMP threads that spin-wait make small CPU runs up to 3x slower and erratic; must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json

import numpy as np
import torch

import data
import train_policy
import world
from cwpo import win_rate
from model import generate_answers, load_model, load_tokenizer

@torch.no_grad()
def judge_scores(judge_path, tok, prompts, answers, device, batch_size=32):
    """Scores of a gold reward checkpoint (any model.py loads, with a scalar head) for each prompt + answer."""
    judge = load_model(judge_path, dtype=torch.float32, device=device, reward=True).eval()
    has_tokenizer = any(os.path.exists(os.path.join(judge_path, f)) for f in ("tokenizer.json", "vocab.json"))
    judge_tok = load_tokenizer(judge_path) if has_tokenizer else tok  # a judge may read text with its own tokenizer
    seqs = [data.encode_prompt_answer(judge_tok, p, a, 1024, 1024) for p, a in zip(prompts, answers)]
    scores = []
    for chunk in data.iterate_batches(seqs, batch_size):
        batch = data.collate(chunk, judge_tok.pad_id)
        scores += judge(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    return scores

def main(args):
    if not args.policy:
        return world.experiment(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.policy)
    prompts = sorted({p["prompt"] for p in data.load_pairs(args.prompts)})[:args.eval_prompts]
    prompt_ids = [data.encode_prompt(tok, p, 256) for p in prompts]
    answers = {name: generate_answers(load_model(path, device=device), tok, prompt_ids, args.max_new_tokens)
               for name, path in (("policy", args.policy), ("sft", args.sft))}
    scores = {name: judge_scores(args.judge, tok, prompts, a, device) for name, a in answers.items()}
    result = dict(win_rate(scores["policy"], scores["sft"]), mean_reward=float(np.mean(scores["policy"])),
                  prompts=len(prompts))
    print(json.dumps(result))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment", help="built-in experiment: output folder")
    p.add_argument("--quick", action="store_true", help="built-in experiment, smaller (about 2 minutes)")
    p.add_argument("--sweep", action="store_true", help="CW-DPO against DPO at 10 / 20 / 30 % labels")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=2000, help="preference pairs (two answers to one prompt)")
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--samples", type=int, default=4, help="sampled answers per held-out prompt")
    p.add_argument("--sft-examples", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=1, help="preference optimization epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="preference optimization learning rate")
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--labeled-fraction", type=float, default=0.3)
    p.add_argument("--policy", help="GRA of this checkpoint against --sft, judged by --judge, on --prompts")
    p.add_argument("--sft")
    p.add_argument("--prompts", help="a pairs file whose prompts are evaluated")
    p.add_argument("--judge", help="gold reward checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        vars(args).update(seeds=2, pairs=800, eval_prompts=100, sft_examples=800)
    train_policy.run_script(main, args)
