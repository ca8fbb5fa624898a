"""Gold Reward Accuracy of a checkpoint, and the main command: the built-in experiment (world.py).

    python eval.py                 # 5 seeds, every method; --quick: a smaller run; --sweep: 10 / 20 / 30 %
    python eval.py --policy runs/cw-dpo --sft runs/sft --prompts heldout.jsonl --judge gold-rm/

GRA (arXiv 2603.04968, Gold Reward Accuracy): for held-out prompts, a gold judge scores the aligned
policy's answer and the SFT model's answer; GRA is the % of prompts where the aligned answer scores
higher (ties count half). In the built-in world the judge is a program (world.gold_reward); here a
reward checkpoint.
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
import runs
import world
from cwpo import win_rate
from generate import generate_answers
from model import check_fits, config_from_hf, load_model, load_tokenizer, read_json

@torch.no_grad()
def judge_scores(judge_path, judge, judge_tok, prompts, answers, device, batch_size=32):
    """Scores of a gold reward model (with its trained scalar head) for each prompt + answer, read
    with judge_tok."""
    seqs = [data.encode_prompt_answer(judge_tok, p, a, 1024, 1024) for p, a in zip(prompts, answers)]
    longest = max(len(s["prompt_ids"] + s["answer_ids"]) for s in seqs)
    check_fits(judge_path, judge.config, judge_tok, longest, "the prompts + answers it reads")

    scores = []
    for chunk in data.iterate_batches(seqs, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
        scores += judge(batch["input_ids"], layout=batch).tolist()
    return scores

def main(args):
    if not args.policy:
        return world.experiment(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = {"policy": args.policy, "sft": args.sft}
    toks = {name: load_tokenizer(path) for name, path in paths.items()}  # each reads its own tokens
    judge_tok = load_tokenizer(args.judge)  # a folder without its tokenizer stops the run
    pairs = formats.load_pairs(args.prompts)
    prompts = sorted({p["prompt"] for p in pairs})[:args.eval_prompts]
    prompt_ids = {name: [data.encode_prompt(tok, p, 256) for p in prompts]
                  for name, tok in toks.items()}
    judge = load_model(args.judge, dtype=torch.float32, device=device, reward=True,
                       trained_head=True).eval()

    # checked before generation; the judge's again on the answers, in judge_scores
    for name, path in paths.items():
        cfg_file = os.path.join(path, "config.json")
        longest = max(map(len, prompt_ids[name])) + args.max_new_tokens
        check_fits(path, config_from_hf(read_json(cfg_file), cfg_file), toks[name], longest,
                   "the prompts + --max-new-tokens", cache=True)
    judge_longest = max(len(judge_tok.encode(p).ids) for p in prompts) + args.max_new_tokens + 1
    check_fits(args.judge, judge.config, judge_tok, judge_longest, "the prompts + --max-new-tokens + EOS")

    answers, scores = {}, {}
    for name, path in paths.items():
        model = load_model(path, device=device)
        answers[name] = generate_answers(model, toks[name], prompt_ids[name], args.max_new_tokens)
        scores[name] = judge_scores(args.judge, judge, judge_tok, prompts, answers[name], device)

    result = win_rate(scores["policy"], scores["sft"])
    result.update(mean_reward=float(np.mean(scores["policy"])), prompts=len(prompts))
    print(json.dumps(result))

def parse_args(argv=None):
    """The flags, checked before any work: an explicit flag wins over --quick, and --policy needs its
    three partners."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    world.add_args(p)  # the built-in experiment's flags
    p.add_argument("--eval-prompts", type=runs.positive_int, default=300, help="prompts (--quick: 100)")
    p.add_argument("--policy", help="GRA of this checkpoint against --sft, judged by --judge")
    p.add_argument("--sft")
    p.add_argument("--prompts", help="a pairs file whose prompts are evaluated")
    p.add_argument("--judge", help="gold reward checkpoint folder (with its trained score.weight)")
    p.add_argument("--max-new-tokens", type=runs.positive_int, default=128)

    quick = p.parse_known_args(argv)[0].quick
    args = p.parse_args(argv, argparse.Namespace(**world.QUICK) if quick else None)
    given = [f"--{name}" for name in ("policy", "sft", "judge", "prompts") if getattr(args, name)]
    if given and len(given) < 4:
        p.error(f"--policy, --sft, --judge and --prompts go together; given only {', '.join(given)}")
    return args

if __name__ == "__main__":
    runs.run_script(main, parse_args())
