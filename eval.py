"""Gold Reward Accuracy, and the built-in experiment: CW-PO on a synthetic world whose gold reward is a program.

    python eval.py                 # 5 seeds, every method; --quick: a smaller run; --sweep: 10 / 20 / 30 % labels
    python eval.py --policy runs/cw-dpo --sft runs/sft --prompts heldout.jsonl --judge gold-rm/

GRA (arXiv 2603.04968, Gold Reward Accuracy): for held-out prompts, a gold judge scores the aligned policy's answer and
the SFT model's answer; GRA is the % of prompts where the aligned answer scores higher (ties count half).
In the built-in world the judge is a program (data.gold_reward); otherwise a reward checkpoint.
"""
import os

# OpenMP threads that spin-wait make small CPU runs up to 3x slower and erratic; must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import pathlib
import random
import time
from typing import NamedTuple

import numpy as np
import torch

import data
import train_policy
import train_weak
from model import GPT, atomic_write, config_from_hf, generate, load_model, load_tokenizer, save_model
from tools.figures import results_markdown, write_figures

def generate_answers(model, tok, prompts, max_new_tokens=64, temperature=0.0, seed=0, batch_size=256):
    """Decoded answers of `model` to each prompt (greedy by default), with model.py's KV cache."""
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    answers = []
    for chunk in data.iterate_batches(prompts, batch_size):
        ids = [data.encode_prompt(tok, p, 256) for p in chunk]
        new = generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, generator=generator)
        answers += [tok.decode(a) for a in new]
    return answers

def win_rate(policy_rewards, sft_rewards, n_boot=2000, seed=0):
    """GRA in %: mean over prompts of [policy > sft] + 0.5 [policy == sft], with a bootstrap 95 % interval."""
    policy_rewards, sft_rewards = np.asarray(policy_rewards), np.asarray(sft_rewards)
    wins = (policy_rewards > sft_rewards) + 0.5 * (policy_rewards == sft_rewards)
    boots = np.random.default_rng(seed).choice(wins, (n_boot, len(wins))).mean(1)
    return {"gra": 100 * wins.mean(), "lo": 100 * np.percentile(boots, 2.5), "hi": 100 * np.percentile(boots, 97.5)}

@torch.no_grad()
def judge_scores(judge_path, tok, prompts, answers, device, batch_size=32):
    """Scores of a gold reward checkpoint (any model.py loads, with a scalar head) for each prompt + answer."""
    judge = load_model(judge_path, dtype=torch.float32, device=device, reward=True).eval()
    has_tokenizer = any(os.path.exists(os.path.join(judge_path, f)) for f in ("tokenizer.json", "vocab.json"))
    judge_tok = load_tokenizer(judge_path) if has_tokenizer else tok  # a judge may read text with its own tokenizer
    seqs = [data.encode_prompt_answer(judge_tok, p, a, 1024, 1024) for p, a in zip(prompts, answers)]
    scores = []
    for chunk in data.iterate_batches(seqs, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk, judge_tok.pad_id).items()}
        scores += judge(batch["input_ids"], layout=batch).tolist()
    return scores

# --------------------------------------------------------------------------- the built-in experiment

RDPO = {"label_smoothing": 0.1}  # rDPO's assumed label-flip rate epsilon (0 would make it plain DPO)
REFERENCE = "DPO, human 100 %"  # every method's paired difference is taken to this one
METHODS = {  # name: (training pairs, train_policy options): 100 % human labels, the labeled part, or weak labels
    REFERENCE: ("human_pool", {}),
    "DPO, labeled part only": ("labeled", {}),
    "WS-DPO (weak labels, weight 1)": ("weak", {}),
    "Top-30 % confident weak labels": ("weak", {"weighting": "top", "top_fraction": 0.3}),
    "CW-DPO": ("weak", {"weighting": "confidence"}),
    "rDPO, human 100 %": ("human_pool", {"loss": "robust", "loss_options": RDPO}),
    "CW-rDPO": ("weak", {"weighting": "confidence", "loss": "robust", "loss_options": RDPO}),
}
SWEEP = (REFERENCE, "DPO, labeled part only", "CW-DPO")
POLICY_SIZE, WEAK_SIZE = (3, 96), (2, 64)  # (layers, width) of the strong policy and of the weak annotator
VOCAB_SIZE, PRETRAIN_EPOCHS = 400, 4  # byte-level BPE trained on the world's text; epochs over that text
ANNOTATOR_LR, ANNOTATOR_EPOCHS = 1e-3, 2  # its Bradley-Terry training on the labeled part
HUMAN_AGREEMENT = 0.70  # with gold, as reported between human annotators on HH-RLHF and TL;DR; sets the BT temperature
T_975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t quantiles, 1-10 df

class World(NamedTuple):
    tok: object
    sft_path: str
    weak_path: str
    pool: list  # {"prompt", "chosen", "rejected", "gold_margin"}: the pairs in drawn order, before any label
    held_out: list  # prompts
    sft_rewards: dict  # "sampled": the SFT model's mean gold reward over samples, per prompt; "greedy": of its answer
    human_temperature: float

def train(model, tok, pairs, start, out, device, log, **options):
    """The one place that trains through train_policy (SFT, BT or preference): its flags, then `options`."""
    argv = ["--model", start, "--data", "-", "--out", out, "--max-prompt-len", "48", "--max-answer-len", "48"]
    args = train_policy.parser().parse_args(argv + ["--log-every", "100000"])
    vars(args).update(dict(grad_checkpointing=False), **options)  # tiny models: memory is no concern
    os.makedirs(out, exist_ok=True)
    if args.objective == "bt":
        return train_weak.train_annotator(pairs, args, device, log), args
    examples = train_policy.encode_examples(tok, pairs, args)
    if args.objective == "preference":
        train_policy.add_reference_logps(model, examples, tok.pad_id, 256, device)
    objective = train_policy.OBJECTIVES[args.objective]
    return train_policy.train(model, examples, tok.pad_id, args, objective, device=device, log=log), args

def pretrain(path, tok, pairs, size, device, log):
    """A Llama-style model of `size` = (layers, width) trained from scratch on the world's text, saved in HF layout."""
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=size[1], num_hidden_layers=size[0],
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * size[1], max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              tie_word_embeddings=True, hidden_act="silu", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id, dtype="float32")
    torch.manual_seed(0)
    model = GPT(config_from_hf(hf)).init_weights().to(device)
    train(model, tok, pairs, path, path, device, log, objective="sft", lr=3e-3, epochs=PRETRAIN_EPOCHS, batch_size=64)
    save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pathlib.Path(path) / name).write_text((pathlib.Path(path).parent / "tokenizer" / name).read_text())

def gold_rewards(model, tok, prompts, samples):
    """Gold rewards of the greedy answer [P] and the mean over `samples` answers sampled at temperature 1 [P]."""
    greedy = [data.gold_reward(p, a) for p, a in zip(prompts, generate_answers(model, tok, prompts))]
    answers = generate_answers(model, tok, [p for p in prompts for _ in range(samples)], temperature=1.0, seed=1)
    sampled = [data.gold_reward(p, a) for p, a in zip(np.repeat(prompts, samples), answers)]
    return {"greedy": greedy, "sampled": np.reshape(sampled, (-1, samples)).mean(1)}

def build_world(args, device, log):
    """Tokenizer, SFT policy and weak base model pretrained on the world's answers; the pair pool; held-out prompts."""
    rng = random.Random(0)
    corpus = [{"prompt": p, "chosen": data.world_answer(p, rng)} for p in data.world_prompts(args.sft_examples, 1)]
    texts = [p["prompt"] + p["chosen"] for p in corpus]
    tok = data.train_tokenizer(texts, VOCAB_SIZE, os.path.join(args.out, "tokenizer"))
    sft_path, weak_path = os.path.join(args.out, "sft"), os.path.join(args.out, "weak_base")
    for path, size in ((sft_path, POLICY_SIZE), (weak_path, WEAK_SIZE)):  # both: SFT on the same answers
        pretrain(path, tok, corpus, size, device, log)
    prompts = data.world_prompts(args.pairs + args.eval_prompts, seed=2)
    answers = [(data.world_answer(p, rng), data.world_answer(p, rng)) for p in prompts[:args.pairs]]
    pool = [{"prompt": p, "chosen": a, "rejected": b, "gold_margin": data.gold_reward(p, a) - data.gold_reward(p, b)}
            for p, (a, b) in zip(prompts, answers)]
    temperature = data.human_temperature([p["gold_margin"] for p in pool], HUMAN_AGREEMENT)
    sft_rewards = gold_rewards(load_model(sft_path, device=device), tok, prompts[args.pairs:], args.samples)
    return World(tok, sft_path, weak_path, pool, prompts[args.pairs:], sft_rewards, temperature)

def run_seed(seed, world, args, fraction, methods, device, log, progress):
    """One seed: human labels, the split, the annotator and its weak labels, then each method -> results."""
    rng, human = random.Random(seed), []
    for p in world.pool:  # a noisy human keeps or swaps the drawn order
        keep = data.human_label(p["gold_margin"], 0.0, world.human_temperature, rng)
        human.append(p if keep else dict(p, chosen=p["rejected"], rejected=p["chosen"], gold_margin=-p["gold_margin"]))
    labeled, unlabeled, _ = data.split_pairs(human, fraction, 0, seed)
    out = os.path.join(args.out, f"seed{seed}")
    (rm, tok), wargs = train(None, world.tok, labeled, world.weak_path, out + "/weak", device, log, objective="bt",
                             lr=ANNOTATOR_LR, epochs=ANNOTATOR_EPOCHS, seed=seed)
    weak = train_weak.weak_labels(unlabeled, *train_weak.score_pairs(rm, tok, unlabeled, wargs, device))
    # the annotator is right when it agrees with the gold ranking (gold ties left out)
    ranked = [(w["confidence"], int((u["gold_margin"] > 0) == bool(w["human_agrees"])))
              for u, w in zip(unlabeled, weak) if u["gold_margin"]]
    result = {"annotator_vs_gold": train_weak.annotator_report(*zip(*ranked)), "methods": {},
              "human_vs_gold": float(np.mean([h["gold_margin"] > 0 for h in human if h["gold_margin"]]))}
    progress(seed)
    sets = {"human_pool": labeled + unlabeled, "labeled": labeled, "weak": weak}
    for name in methods:
        (subset, options), policy = METHODS[name], load_model(world.sft_path, device=device)
        train(policy, tok, sets[subset], world.sft_path, out + "/policy", device, log, lr=args.lr, beta=args.beta,
              epochs=args.epochs, seed=seed, **options)
        rewards = gold_rewards(policy, tok, world.held_out, args.samples)
        result["methods"][name] = dict(win_rate(rewards["sampled"], world.sft_rewards["sampled"], seed=seed),
                                       gra_greedy=win_rate(rewards["greedy"], world.sft_rewards["greedy"])["gra"],
                                       mean_reward=float(rewards["sampled"].mean()), pairs=len(sets[subset]))
        progress(seed, f"{name}: GRA {result['methods'][name]['gra']:.1f} %")
    return result

def interval(values):
    """Mean and the half-width of its 95 % t-interval over seeds."""
    values = np.asarray(values, dtype=float)  # one seed gives no interval (nan)
    t = T_975[len(values) - 2] if 2 <= len(values) <= len(T_975) + 1 else 2.0
    return float(values.mean()), float(t * values.std(ddof=1) / np.sqrt(len(values)))

def world_checks(seeds):
    """Is this a world where CW-PO can show its effect? Checked without any CW-PO method, averaged over seeds."""
    ann = {k: np.mean([s["annotator_vs_gold"][k] for s in seeds]) for k in ("accuracy", "accuracy_top30")}
    dpo, human = [s["methods"][REFERENCE]["gra"] for s in seeds], np.mean([s["human_vs_gold"] for s in seeds])
    checks = [("annotator agrees with gold on >= 65 % of the unlabeled pairs", ann["accuracy"], 0.65),
              ("its 30 % most confident labels: >= 8 points more", ann["accuracy_top30"] - ann["accuracy"], 0.08),
              ("human labels agree with gold on 67-73 % of the pairs", human, 0.67 if human <= 0.73 else np.inf),
              (f"{REFERENCE} beats SFT on every seed: lowest GRA > 50", min(dpo), 50 + 1e-9),
              (f"{REFERENCE}: mean GRA >= 65", np.mean(dpo), 65)]
    return [{"check": c, "value": float(v), "passed": bool(v >= least)} for c, v, least in checks]

def summarize(seeds, methods):
    """Per method: mean GRA with its 95 % t-interval over seeds, and the paired difference to REFERENCE."""
    rows = {}
    for name in methods:
        gra = [s["methods"][name]["gra"] for s in seeds]
        (mean, half), (diff, d_half) = interval(gra), interval([g - s["methods"][REFERENCE]["gra"]
                                                                  for g, s in zip(gra, seeds)])
        verdict = "better" if diff - d_half > 0 else "worse" if diff + d_half < 0 else "no difference shown"
        rows[name] = {"gra": mean, "lo": mean - half, "hi": mean + half, "diff": diff, "diff_lo": diff - d_half,
                      "diff_hi": diff + d_half, "verdict": verdict if name != REFERENCE else "", "per_seed": gra,
                      "gra_greedy": float(np.mean([s["methods"][name]["gra_greedy"] for s in seeds]))}
    return rows

def experiment(args):
    t0, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    world = build_world(args, device, log)
    log(f"world: {len(world.pool)} pairs, {len(world.held_out)} prompts, human T {world.human_temperature:.2f}")
    runs = [(f, SWEEP) for f in (0.1, 0.2, 0.3)] if args.sweep else [(args.labeled_fraction, tuple(METHODS))]
    units, done, t_start = args.seeds * sum(len(m) + 1 for _, m in runs), [0], time.time()

    def progress(seed, what="annotator trained"):
        done[0] += 1
        eta = (time.time() - t_start) / done[0] * (units - done[0])
        log(f"seed {seed + 1} of {args.seeds} | step {done[0]} of {units} | {what} | ETA {eta / 60:.1f} min")

    results = {"args": vars(args), "runs": []}
    for fraction, methods in runs:
        seeds = [run_seed(seed, world, args, fraction, methods, device, log, progress) for seed in range(args.seeds)]
        results["runs"].append({"labeled_fraction": fraction, "seeds": seeds, "summary": summarize(seeds, methods),
                                "checks": world_checks(seeds)})
    results["seconds"] = time.time() - t0
    text = results_markdown(results, REFERENCE)
    print("\n" + text)
    atomic_write(os.path.join(args.out, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(text + "\n"))
    atomic_write(os.path.join(args.out, "results.json"), lambda tmp: pathlib.Path(tmp).write_text(
        json.dumps(results, indent=1, default=float)))
    write_figures(results, args.out)

def main(args):
    if not args.policy:
        return experiment(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.policy)
    prompts = sorted({p["prompt"] for p in data.load_pairs(args.prompts)})[:args.eval_prompts]
    answers = {name: generate_answers(load_model(path, device=device), tok, prompts, args.max_new_tokens)
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
