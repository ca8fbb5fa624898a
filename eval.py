"""Gold Reward Accuracy, and the built-in experiment: the paper's table in miniature.

    python eval.py                 # the built-in world: ~10 min on 2 CPU cores; --quick: ~1 min
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

import numpy as np
import torch

import data
import train_policy
import train_weak
from model import GPT, atomic_write, config_from_hf, generate, load_model, load_tokenizer, save_model


def generate_answers(model, tok, prompts, max_prompt_len=256, max_new_tokens=64, batch_size=64, temperature=0.0, seed=0):
    """Decoded answers of `model` to each prompt (greedy by default), with model.py's KV cache."""
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [data.encode_prompt(tok, p, max_prompt_len) for p in prompts[start:start + batch_size]]
        new = generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, generator=generator)
        answers += [tok.decode(a) for a in new]
    return answers


def win_rate(policy_rewards, sft_rewards, n_boot=2000, seed=0):
    """GRA in %: mean over prompts of [policy > sft] + 0.5 [policy == sft], with a bootstrap 95 % interval."""
    wins = (np.asarray(policy_rewards) > np.asarray(sft_rewards)) + 0.5 * (np.asarray(policy_rewards) == np.asarray(sft_rewards))
    boots = np.random.default_rng(seed).choice(wins, (n_boot, len(wins))).mean(1)
    return {"gra": 100 * wins.mean(), "lo": 100 * np.percentile(boots, 2.5), "hi": 100 * np.percentile(boots, 97.5)}


@torch.no_grad()
def judge_scores(judge_path, tok, prompts, answers, device, batch_size=32):
    """Scores of a gold reward checkpoint (any model.py loads, with a scalar head) for each prompt + answer."""
    judge = load_model(judge_path, dtype=torch.float32, device=device, reward=True).eval()
    has_tokenizer = any(os.path.exists(os.path.join(judge_path, f)) for f in ("tokenizer.json", "vocab.json"))
    judge_tok = load_tokenizer(judge_path) if has_tokenizer else tok  # a judge may read text with its own tokenizer
    scores = []
    for start in range(0, len(prompts), batch_size):
        seqs = [data.encode_prompt_answer(judge_tok, p, a, 1024, 1024) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        batch = data.collate(seqs, judge_tok.pad_id)
        scores += judge(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    return scores


# --------------------------------------------------------------------------- the built-in experiment

RDPO = {"label_smoothing": 0.1}  # rDPO's assumed label-flip rate epsilon (0 would make it plain DPO)
METHODS = {  # name: (training pairs, loss, loss options, weighting, normalization)
    "DPO, human 100 %": ("human_pool", "sigmoid", {}, "none", "mean"),
    "DPO, human 30 % only": ("labeled", "sigmoid", {}, "none", "mean"),
    "WS-DPO (weak labels, weight 1)": ("weak", "sigmoid", {}, "none", "mean"),
    "Top-30 % confident weak labels": ("weak", "sigmoid", {}, "top", "mean"),
    "CW-DPO": ("weak", "sigmoid", {}, "confidence", "mean"),
    "CW-DPO, normalized by sum C": ("weak", "sigmoid", {}, "confidence", "sum_w"),
    "IPO, human 100 %": ("human_pool", "ipo", {}, "none", "mean"),
    "CW-IPO": ("weak", "ipo", {}, "confidence", "mean"),
    "rDPO, human 100 %": ("human_pool", "robust", RDPO, "none", "mean"),
    "CW-rDPO": ("weak", "robust", RDPO, "confidence", "mean"),
}


def training_args(model, out, **overrides):
    argv = ["--model", model, "--data", "-", "--out", out, "--max-prompt-len", "48", "--max-answer-len", "48", "--log-every", "1000"]
    args = train_policy.parser().parse_args(argv)
    vars(args).update(dict(grad_checkpointing=False), **overrides)  # tiny models: memory is no concern
    os.makedirs(out, exist_ok=True)
    return args


def pretrain(path, tok, sft_pairs, n_layer, d_model, args, device, log):
    """A small Llama-style model trained from scratch on the world's text (the SFT stage), saved in HF layout."""
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=d_model, num_hidden_layers=n_layer,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * d_model, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
              hidden_act="silu", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, dtype="float32")
    torch.manual_seed(0)
    model = GPT(config_from_hf(hf)).init_weights().to(device)
    targs = training_args(path, path, objective="sft", lr=3e-3, epochs=args.sft_epochs, batch_size=64, warmup_steps=20)
    examples = train_policy.encode_examples(tok, sft_pairs, targs)
    train_policy.train(model, examples, tok.pad_id, targs, train_policy.sft_objective, device=device, log=log)
    save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pathlib.Path(path) / name).write_text((pathlib.Path(args.out) / "tokenizer" / name).read_text())


def build_world(args, device, log):
    """Tokenizer, SFT policy and weak base model; candidate pairs sampled from the SFT policy; held-out prompts."""
    rng = random.Random(0)
    sft_pairs = [{"prompt": p, "chosen": data.world_answer(p, rng)} for p in data.world_prompts(args.sft_examples, seed=1)]
    tok = data.train_tokenizer([p["prompt"] + p["chosen"] for p in sft_pairs], 650, os.path.join(args.out, "tokenizer"))
    paths = {"sft": os.path.join(args.out, "sft"), "weak_base": os.path.join(args.out, "weak_base")}
    pretrain(paths["sft"], tok, sft_pairs, 4, 128, args, device, log)
    pretrain(paths["weak_base"], tok, sft_pairs, 2, 64, args, device, log)
    sft = load_model(paths["sft"], device=device)
    prompts = data.world_prompts(args.pairs + args.eval_prompts, seed=2)
    pool, held_out = prompts[:args.pairs], prompts[args.pairs:]
    a = generate_answers(sft, tok, pool, temperature=1.0, seed=1)
    b = generate_answers(sft, tok, pool, temperature=1.0, seed=2)
    pairs = [{"prompt": p, "answer_a": x, "answer_b": y, "gold_a": data.gold_reward(p, x), "gold_b": data.gold_reward(p, y)}
             for p, x, y in zip(pool, a, b) if x != y]
    sft_answers = generate_answers(sft, tok, held_out)
    return tok, paths, pairs, held_out, [data.gold_reward(p, x) for p, x in zip(held_out, sft_answers)]


def run_seed(seed, world, args, device, log):
    """Noisy human labels, the annotator, and every method of METHODS for one seed -> results."""
    tok, paths, pairs, held_out, sft_rewards = world
    rng = random.Random(seed)
    human = []
    for p in pairs:
        a_wins = data.human_label(p["gold_a"], p["gold_b"], args.human_temperature, rng)
        chosen, rejected = ("a", "b") if a_wins else ("b", "a")
        human.append({"prompt": p["prompt"], "chosen": p[f"answer_{chosen}"], "rejected": p[f"answer_{rejected}"],
                      "gold_margin": p[f"gold_{chosen}"] - p[f"gold_{rejected}"]})
    labeled, unlabeled, _ = data.split_pairs(human, args.labeled_fraction, 0, seed)
    out = os.path.join(args.out, f"seed{seed}")
    wargs = training_args(paths["weak_base"], out + "/weak", objective="bt", lr=1e-3, epochs=args.weak_epochs, seed=seed)
    rm, _ = train_weak.train_annotator(labeled, wargs, device, log)
    weak = train_weak.weak_labels(unlabeled, *train_weak.score_pairs(rm, tok, unlabeled, wargs, device))
    # the annotator is right when it agrees with the gold ranking (gold ties left out)
    gold_correct = [int((u["gold_margin"] > 0) == bool(w["human_agrees"])) for u, w in zip(unlabeled, weak) if u["gold_margin"]]
    confidence = [w["confidence"] for u, w in zip(unlabeled, weak) if u["gold_margin"]]
    result = {"annotator_vs_gold": train_weak.annotator_report(confidence, gold_correct),
              "annotator_vs_human": np.mean([w["human_agrees"] for w in weak]),
              "human_vs_gold": np.mean([h["gold_margin"] > 0 for h in human if h["gold_margin"]]), "methods": {}}
    sets = {"human_pool": labeled + unlabeled, "labeled": labeled, "weak": weak}
    for name, (subset, loss, options, weighting, normalize) in METHODS.items():
        policy = load_model(paths["sft"], device=device)
        pargs = training_args(paths["sft"], out + "/policy", loss=loss, loss_options=options, weighting=weighting,
                              normalize=normalize, lr=args.lr, beta=args.beta, epochs=args.epochs, seed=seed, top_fraction=0.3)
        examples = train_policy.encode_examples(tok, sets[subset], pargs)
        train_policy.add_reference_logps(policy, examples, tok.pad_id, 64, device, bf16=pargs.bf16)
        train_policy.train(policy, examples, tok.pad_id, pargs, train_policy.preference_objective, device=device,
                           log=log)
        rewards = [data.gold_reward(p, x) for p, x in zip(held_out, generate_answers(policy, tok, held_out))]
        result["methods"][name] = dict(win_rate(rewards, sft_rewards, seed=seed), mean_reward=float(np.mean(rewards)), pairs=len(examples))
        log(f"seed {seed} | {name:32s} | GRA {result['methods'][name]['gra']:5.1f} % | gold reward {np.mean(rewards):+.3f}")
    return result


def table(results, args, seconds):
    """The paper's table in miniature, as markdown: GRA per seed (each with its bootstrap 95 % interval in the JSON)."""
    lines = [f"GRA: % of {args.eval_prompts} held-out prompts where the policy's greedy answer beats the SFT model's under the "
             f"gold reward (ties half), mean over {len(results)} seed(s) and per seed. {args.pairs} pairs, "
             f"{args.labeled_fraction:.0%} human-labeled; run time {seconds / 60:.1f} min.", "",
             "| method | GRA % | per seed | mean gold reward | pairs |", "|---|---|---|---|---|",
             f"| SFT | 50.0 | | {np.mean(results[0]['sft_reward']):+.3f} | |"]
    for name in METHODS:
        rows = [r["methods"][name] for r in results]
        per_seed = " / ".join(f"{r['gra']:.1f}" for r in rows)
        lines.append(f"| {name} | {np.mean([r['gra'] for r in rows]):.1f} | {per_seed} | "
                     f"{np.mean([r['mean_reward'] for r in rows]):+.3f} | {rows[0]['pairs']} |")
    ann = {k: np.mean([r["annotator_vs_gold"][k] for r in results]) for k in results[0]["annotator_vs_gold"]
           if k != "bins"}
    lines += ["", f"Annotator (weak model, {args.labeled_fraction:.0%} labels) on the unlabeled pairs: accuracy vs gold "
              f"{ann['accuracy']:.3f} (top 10/30/50 % confident: {ann['accuracy_top10']:.3f} / {ann['accuracy_top30']:.3f} / "
              f"{ann['accuracy_top50']:.3f}), ECE {ann['ece']:.3f}; agreement with human labels "
              f"{np.mean([r['annotator_vs_human'] for r in results]):.3f}; human labels vs gold "
              f"{np.mean([r['human_vs_gold'] for r in results]):.3f}."]
    return "\n".join(lines)


def experiment(args):
    t0, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)
    world = build_world(args, device, log)
    log(f"world: {len(world[2])} candidate pairs from the SFT policy, {len(world[3])} held-out prompts")
    results = []
    for seed in range(args.seeds):
        results.append(dict(run_seed(seed, world, args, device, log), sft_reward=world[4]))
    text = table(results, args, time.time() - t0)
    print("\n" + text)
    atomic_write(os.path.join(args.out, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(text + "\n"))
    atomic_write(os.path.join(args.out, "results.json"), lambda tmp: pathlib.Path(tmp).write_text(
        json.dumps({"args": vars(args), "seeds": results, "seconds": time.time() - t0}, indent=1, default=float)))


def main(args):
    if not args.policy:
        return experiment(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.policy)
    prompts = sorted({p["prompt"] for p in data.load_pairs(args.prompts)})[:args.eval_prompts]
    answers = {name: generate_answers(load_model(path, device=device), tok, prompts, max_new_tokens=args.max_new_tokens)
               for name, path in (("policy", args.policy), ("sft", args.sft))}
    scores = {name: judge_scores(args.judge, tok, prompts, a, device) for name, a in answers.items()}
    result = dict(win_rate(scores["policy"], scores["sft"]), mean_reward=float(np.mean(scores["policy"])), prompts=len(prompts))
    print(json.dumps(result))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment", help="built-in experiment: output folder")
    p.add_argument("--quick", action="store_true", help="built-in experiment, smaller (about a minute)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=1600, help="candidate pairs sampled from the SFT policy")
    p.add_argument("--eval-prompts", type=int, default=400)
    p.add_argument("--sft-examples", type=int, default=4000)
    p.add_argument("--sft-epochs", type=int, default=3)
    p.add_argument("--weak-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="preference optimization epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="preference optimization learning rate")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--labeled-fraction", type=float, default=0.3)
    p.add_argument("--human-temperature", type=float, default=data.DEFAULT_HUMAN_TEMPERATURE)
    p.add_argument("--policy", help="GRA of this checkpoint against --sft, judged by --judge, on --prompts")
    p.add_argument("--sft")
    p.add_argument("--prompts", help="a pairs file whose prompts are evaluated")
    p.add_argument("--judge", help="gold reward checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        vars(args).update(seeds=1, pairs=400, eval_prompts=100, sft_examples=1000, sft_epochs=2, weak_epochs=2, epochs=1)
    main(args)
