"""Gold Reward Accuracy, and the built-in experiment: CW-PO on a synthetic world whose gold reward is a program.

    python eval.py                 # 5 seeds, every method; --quick: a smaller run; --sweep: 10 / 20 / 30 % labels
    python eval.py --policy runs/cw-dpo --sft runs/sft --prompts heldout.jsonl --judge gold-rm/

GRA (arXiv 2603.04968, Evaluation): for held-out prompts, a gold judge scores the aligned policy's answer and
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
from tools.figures import write_figures


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
        batch = data.collate(chunk, judge_tok.pad_id)
        scores += judge(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    return scores


# --------------------------------------------------------------------------- the built-in experiment

class Method(NamedTuple):
    pairs: str  # "human_pool" (100 % human labels), "labeled" (the labeled part alone) or "weak" (annotator labels)
    loss: str
    weighting: str = "none"
    options: str = "{}"
    normalize: str = "mean"


RDPO = '{"label_smoothing": 0.1}'  # rDPO's assumed label-flip rate epsilon (0 would make it plain DPO)
REFERENCE = "DPO, human 100 %"  # every method's paired difference is taken to this one
METHODS = {
    REFERENCE: Method("human_pool", "sigmoid"),
    "DPO, labeled part only": Method("labeled", "sigmoid"),
    "WS-DPO (weak labels, weight 1)": Method("weak", "sigmoid"),
    "Top-30 % confident weak labels": Method("weak", "sigmoid", "top"),
    "CW-DPO": Method("weak", "sigmoid", "confidence"),
    "CW-DPO, normalized by sum C": Method("weak", "sigmoid", "confidence", normalize="sum_w"),
    "rDPO, human 100 %": Method("human_pool", "robust", options=RDPO),
    "CW-rDPO": Method("weak", "robust", "confidence", RDPO),
}
SWEEP = (REFERENCE, "DPO, labeled part only", "CW-DPO")
POLICY_SIZE, WEAK_SIZE = (3, 96), (2, 64)  # (layers, width) of the strong policy and of the weak annotator
VOCAB_SIZE = 400  # byte-level BPE trained on the world's text
T_975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)


class World(NamedTuple):
    tok: object
    sft_path: str
    weak_path: str
    pool: list  # {"prompt", "answer_a", "answer_b", "gold_a", "gold_b"}: the preference pairs, before any label
    held_out: list  # prompts
    sft_rewards: dict  # "sampled": mean gold reward of the SFT model's samples per prompt, "greedy": of its answer
    human_temperature: float


def train_args(start, out, **overrides):
    """The one place that calls train_policy's and train_weak's training (shared flags, then overrides)."""
    argv = ["--model", start, "--data", "-", "--out", out, "--max-prompt-len", "48", "--max-answer-len", "48"]
    args = train_policy.parser().parse_args(argv + ["--log-every", "100000"])
    vars(args).update(overrides)
    os.makedirs(out, exist_ok=True)
    return args


def train(model, tok, pairs, args, device, log):
    examples = train_policy.encode_examples(tok, pairs, args)
    if args.objective == "preference":
        train_policy.add_reference_logps(model, examples, tok.pad_id, 256, device)
    return train_policy.train(model, examples, tok.pad_id, args, device=device, log=log)


def pretrain(path, tok, pairs, size, epochs, device, log):
    """A Llama-style model of `size` = (layers, width) trained from scratch on the world's text, saved in HF layout."""
    n_layer, width = size
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=width, num_hidden_layers=n_layer,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              tie_word_embeddings=True, hidden_act="silu", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id, dtype="float32")
    torch.manual_seed(0)
    model = GPT(config_from_hf(hf)).init_weights().to(device)
    train(model, tok, pairs, train_args(path, path, objective="sft", lr=3e-3, epochs=epochs, batch_size=64), device, log)
    save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pathlib.Path(path) / name).write_text((pathlib.Path(path).parent / "tokenizer" / name).read_text())


def sampled_rewards(model, tok, prompts, samples):
    """Mean gold reward of `samples` answers sampled (temperature 1) per prompt: the expected gold reward."""
    answers = generate_answers(model, tok, [p for p in prompts for _ in range(samples)], temperature=1.0, seed=1)
    return np.reshape([data.gold_reward(p, a) for p, a in zip(np.repeat(prompts, samples), answers)], (-1, samples))


def build_world(args, device, log):
    """Tokenizer, SFT policy and weak base model pretrained on the world's text; the pair pool; held-out prompts."""
    rng = random.Random(0)
    corpus = [{"prompt": p, "chosen": data.world_answer(p, rng)} for p in data.world_prompts(args.sft_examples, 1)]
    weak_corpus = [{"prompt": "", "chosen": p["prompt"] + p["chosen"]} for p in corpus]
    weak_corpus += [{"prompt": "", "chosen": " " + fact} for fact in data.world_facts() * 20]
    tok = data.train_tokenizer([p["chosen"] for p in weak_corpus], VOCAB_SIZE, os.path.join(args.out, "tokenizer"))
    sft_path, weak_path = os.path.join(args.out, "sft"), os.path.join(args.out, "weak_base")
    pretrain(sft_path, tok, corpus, POLICY_SIZE, args.sft_epochs, device, log)
    pretrain(weak_path, tok, weak_corpus, WEAK_SIZE, args.weak_pretrain_epochs, device, log)
    prompts = data.world_prompts(args.pairs + args.eval_prompts, seed=2)
    pool = []
    for p in prompts[:args.pairs]:
        a, b = data.world_answer(p, rng), data.world_answer(p, rng)
        pool.append({"prompt": p, "answer_a": a, "answer_b": b, "gold_a": data.gold_reward(p, a),
                     "gold_b": data.gold_reward(p, b)})
    held_out = prompts[args.pairs:]
    sft = load_model(sft_path, device=device)
    greedy = [data.gold_reward(p, a) for p, a in zip(held_out, generate_answers(sft, tok, held_out))]
    temperature = data.human_temperature([p["gold_a"] - p["gold_b"] for p in pool], args.human_agreement)
    return World(tok, sft_path, weak_path, pool, held_out, {"sampled": sampled_rewards(sft, tok, held_out,
                 args.samples).mean(1), "greedy": greedy}, temperature)


def run_seed(seed, world, args, fraction, methods, device, log, progress):
    """One seed: human labels, the split, the annotator and its weak labels, then each method -> results."""
    rng = random.Random(seed)
    human = []
    for p in world.pool:
        first, second = ("a", "b") if data.human_label(p["gold_a"], p["gold_b"], world.human_temperature, rng) \
            else ("b", "a")
        human.append({"prompt": p["prompt"], "chosen": p[f"answer_{first}"], "rejected": p[f"answer_{second}"],
                      "gold_margin": p[f"gold_{first}"] - p[f"gold_{second}"]})
    labeled, unlabeled, _ = data.split_pairs(human, fraction, 0, seed)
    out = os.path.join(args.out, f"seed{seed}")
    wargs = train_args(world.weak_path, out + "/weak", objective="bt", lr=args.weak_lr, epochs=args.weak_epochs,
                       seed=seed)
    rm, tok = train_weak.train_annotator(labeled, wargs, device, log)
    weak = train_weak.weak_labels(unlabeled, *train_weak.score_pairs(rm, tok, unlabeled, wargs, device))
    # the annotator is right when it agrees with the gold ranking (gold ties left out)
    ranked = [(w["confidence"], int((u["gold_margin"] > 0) == bool(w["human_agrees"])))
              for u, w in zip(unlabeled, weak) if u["gold_margin"]]
    result = {"annotator_vs_gold": train_weak.annotator_report(*zip(*ranked)),
              "human_vs_gold": float(np.mean([h["gold_margin"] > 0 for h in human if h["gold_margin"]])),
              "methods": {}}
    progress()
    sets = {"human_pool": labeled + unlabeled, "labeled": labeled, "weak": weak}
    for name in methods:
        method = METHODS[name]
        policy = load_model(world.sft_path, device=device)
        pargs = train_args(world.sft_path, out + "/policy", loss=method.loss, loss_options=method.options, seed=seed,
                           weighting=method.weighting, normalize=method.normalize, lr=args.lr, beta=args.beta,
                           epochs=args.epochs, top_fraction=0.3)
        train(policy, tok, sets[method.pairs], pargs, device, log)
        sampled = sampled_rewards(policy, tok, world.held_out, args.samples)
        greedy = [data.gold_reward(p, a) for p, a in zip(world.held_out, generate_answers(policy, tok, world.held_out))]
        result["methods"][name] = dict(win_rate(sampled.mean(1), world.sft_rewards["sampled"], seed=seed),
                                       gra_greedy=win_rate(greedy, world.sft_rewards["greedy"])["gra"],
                                       mean_reward=float(sampled.mean()), pairs=len(sets[method.pairs]))
        progress(f"{name}: GRA {result['methods'][name]['gra']:.1f} %")
    return result


def interval(values):
    """Mean and the half-width of its 95 % t-interval over seeds (0 for one seed)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / np.sqrt(len(values)))


def world_checks(seeds):
    """The world's own checks, made without any CW-PO method: is the task one where CW-PO can show its effect?"""
    mean = lambda key: float(np.mean([s["annotator_vs_gold"][key] for s in seeds]))  # noqa: E731
    dpo = [s["methods"][REFERENCE]["gra"] for s in seeds]
    human = float(np.mean([s["human_vs_gold"] for s in seeds]))
    checks = [("annotator agrees with gold on >= 65 % of the unlabeled pairs", mean("accuracy"), mean("accuracy") >= 0.65),
              ("annotator's 30 % most confident labels >= 8 points above all", mean("accuracy_top30") - mean("accuracy"),
               mean("accuracy_top30") - mean("accuracy") >= 0.08),
              ("human labels agree with gold on 67-73 % of the pairs", human, abs(human - 0.70) <= 0.03),
              (f"{REFERENCE} beats SFT (GRA > 50) on every seed", min(dpo), min(dpo) > 50),
              (f"{REFERENCE}: mean GRA >= 65", float(np.mean(dpo)), np.mean(dpo) >= 65)]
    return [{"check": c, "value": v, "passed": bool(ok)} for c, v, ok in checks]


def summarize(seeds, methods):
    """Per method: mean GRA with its 95 % t-interval over seeds, and the paired difference to REFERENCE."""
    rows = {}
    for name in methods:
        gra = [s["methods"][name]["gra"] for s in seeds]
        diff = [g - s["methods"][REFERENCE]["gra"] for g, s in zip(gra, seeds)]
        (mean, half), (d_mean, d_half) = interval(gra), interval(diff)
        verdict = "better" if d_mean - d_half > 0 else "worse" if d_mean + d_half < 0 else "no difference shown"
        rows[name] = {"gra": mean, "lo": mean - half, "hi": mean + half, "diff": d_mean, "diff_lo": d_mean - d_half,
                      "diff_hi": d_mean + d_half, "verdict": verdict if name != REFERENCE else "",
                      "gra_greedy": float(np.mean([s["methods"][name]["gra_greedy"] for s in seeds])),
                      "per_seed": gra, "pairs": seeds[0]["methods"][name]["pairs"]}
    return rows


def table(summary, checks, seeds, args):
    ann = {k: np.mean([s["annotator_vs_gold"][k] for s in seeds]) for k in ("accuracy", "accuracy_top30", "ece")}
    lines = [f"GRA: % of {args.eval_prompts} held-out prompts where the policy's expected gold reward ({args.samples} "
             f"sampled answers) beats the SFT model's; mean over {len(seeds)} seeds with its 95 % t-interval; "
             f"difference to {REFERENCE} paired by seed. {args.pairs} pairs.", "",
             "| method | GRA % [95 % CI] | minus DPO, human 100 % [95 % CI] | verdict | greedy GRA % | per seed |",
             "|---|---|---|---|---|---|"]
    for name, r in summary.items():
        diff = "" if name == REFERENCE else f"{r['diff']:+.1f} [{r['diff_lo']:+.1f}, {r['diff_hi']:+.1f}]"
        lines.append(f"| {name} | {r['gra']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}] | {diff} | {r['verdict']} | "
                     f"{r['gra_greedy']:.1f} | {' / '.join(f'{g:.1f}' for g in r['per_seed'])} |")
    lines += ["", f"Annotator on the unlabeled pairs, vs gold: accuracy {ann['accuracy']:.3f}, its 30 % most "
              f"confident {ann['accuracy_top30']:.3f}, ECE {ann['ece']:.3f}.", "", "World checks (no CW-PO method):"]
    lines += [f"- {'PASS' if c['passed'] else 'FAIL'}: {c['check']} ({c['value']:.3f})" for c in checks]
    return "\n".join(lines)


def experiment(args):
    t0, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    world = build_world(args, device, log)
    log(f"world: {len(world.pool)} pairs, {len(world.held_out)} held-out prompts, human T {world.human_temperature:.2f}")
    runs = [(f, SWEEP) for f in (0.1, 0.2, 0.3)] if args.sweep else [(args.labeled_fraction, tuple(METHODS))]
    units, done, t_start = args.seeds * sum(len(m) + 1 for _, m in runs), [0], time.time()

    def progress(what="annotator trained"):
        done[0] += 1
        eta = (time.time() - t_start) / done[0] * (units - done[0])
        log(f"seed {seed + 1} of {args.seeds} | step {done[0]} of {units} | {what} | ETA {eta / 60:.1f} min")

    results = {"args": vars(args), "runs": []}
    for fraction, methods in runs:
        seeds = []
        for seed in range(args.seeds):
            seeds.append(run_seed(seed, world, args, fraction, methods, device, log, progress))
        summary, checks = summarize(seeds, methods), world_checks(seeds)
        results["runs"].append({"labeled_fraction": fraction, "seeds": seeds, "summary": summary, "checks": checks})
    results["seconds"] = time.time() - t0
    text = "\n\n".join(f"## {r['labeled_fraction']:.0%} labeled\n\n" + table(r["summary"], r["checks"], r["seeds"], args)
                       for r in results["runs"]) + f"\n\nRun time {results['seconds'] / 60:.1f} min."
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
    p.add_argument("--sft-epochs", type=int, default=4)
    p.add_argument("--weak-pretrain-epochs", type=int, default=2)
    p.add_argument("--weak-epochs", type=int, default=2)
    p.add_argument("--weak-lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1, help="preference optimization epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="preference optimization learning rate")
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--labeled-fraction", type=float, default=0.3)
    p.add_argument("--human-agreement", type=float, default=0.70, help="sets the human labels' BT temperature")
    p.add_argument("--policy", help="GRA of this checkpoint against --sft, judged by --judge, on --prompts")
    p.add_argument("--sft")
    p.add_argument("--prompts", help="a pairs file whose prompts are evaluated")
    p.add_argument("--judge", help="gold reward checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        vars(args).update(seeds=2, pairs=1000, eval_prompts=100, sft_examples=1000)
    try:
        main(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e.args[0] if e.args else e}")
