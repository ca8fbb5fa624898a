"""The built-in experiment: CW-PO on a synthetic world whose gold reward is a program (run by `python eval.py`).

A person asks for a snack, a drink or a dinner, says which taste they like, and sometimes asks for a short
answer; `gold_reward` scores an answer; `world_answer` writes answers of random care; noisy humans label pairs
by Bradley-Terry on the gold rewards (`human_label`). `experiment` trains the tokenizer, the SFT policy and the
weak base on the world's text, then per seed: human labels, the split, the annotator, its weak labels and every
method of METHODS, each judged by GRA. This is an experiment on the method, not the method: it lives beside the
six files and only calls their public functions.
"""
import json
import math
import os
import pathlib
import random
import re
import time
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import train_policy
import train_weak
from cwpo import win_rate
from model import GPT, atomic_write, config_from_hf, generate_answers, load_model, save_model
from tools.figures import results_markdown, write_figures

# ----------------------------------------------------------------------------- the world
# The assistant recommends one item of a 3 x 4 menu (one item per category and taste), may say what it
# tastes like (truly or not), politely or rudely, with or without filler. gold_reward reads prompt and answer.

CATEGORIES, TASTES = ("snack", "drink", "dinner"), ("sweet", "salty", "spicy", "sour")
MENU = {  # item: (category, taste)
    "caramel popcorn": ("snack", "sweet"), "salted pretzels": ("snack", "salty"), "chili chips": ("snack", "spicy"),
    "lemon candy": ("snack", "sour"), "hot chocolate": ("drink", "sweet"), "tomato juice": ("drink", "salty"),
    "ginger tea": ("drink", "spicy"), "lemonade": ("drink", "sour"), "honey chicken": ("dinner", "sweet"),
    "cheese pasta": ("dinner", "salty"), "chicken curry": ("dinner", "spicy"), "noodle salad": ("dinner", "sour"),
}
ASK = ("Can you suggest a {}?", "I want a {} for tonight.", "What {} should I get?")
LIKE = ("I like {} food.", "I am in the mood for something {}.")
POLITE, RUDE = ("Sure!", "Happy to help!", "Enjoy!"), ("Ugh, fine.", "Whatever.", "Figure it out yourself.")
FILLER = ("Many people like it.", "It is very popular.", "You can find it anywhere.")

def parse_request(prompt):
    """What the person asks for: {"category", "like", "brief"} (None where not said)."""
    text = prompt.rsplit("Human:", 1)[-1].lower()
    category = re.search(r"\b(" + "|".join(CATEGORIES) + r")\b", text)
    like = re.search(r"\b(?:like|something) (" + "|".join(TASTES) + r")\b", text)
    return {"category": category and category.group(1), "like": like and like.group(1), "brief": "short" in text}

def gold_reward(prompt, answer):
    """The world's gold judge: a program reading the prompt and the answer; never raises on a string.
    r = 1.5 [the first item named is of the asked category] - 1.5 [it is not]      (no item named: -3)
        + 1.0 [its taste is the liked one] - 1.0 [a taste claim "It is t." is false]
        + 0.5 [polite] - 1.0 [rude] - 0.5 * (filler sentences, or 1.0 each if asked to keep it short)
    """
    request, text = parse_request(prompt), str(answer).lower()
    named = sorted((text.find(item), item) for item in MENU if item in text)
    if not named:
        reward = -3.0
    else:
        category, taste = MENU[named[0][1]]
        reward = 1.5 if category == request["category"] else -1.5
        reward += 1.0 * (taste == request["like"])
        reward -= 1.0 * any(claim != taste for claim in re.findall(r"\bit is (" + "|".join(TASTES) + r")\b", text))
    reward += 0.5 * any(w.lower() in text for w in POLITE) - 1.0 * any(w.lower() in text for w in RUDE)
    reward -= (1.0 if request["brief"] else 0.5) * sum(text.count(f.lower()) for f in FILLER)
    return float(reward)

def world_prompts(n, seed):
    """n requests in HH-RLHF form "\\n\\nHuman: ...\\n\\nAssistant:"."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(ASK).format(rng.choice(CATEGORIES)), rng.choice(LIKE).format(rng.choice(TASTES))]
        words += ["Please keep it short."] if rng.random() < 0.3 else []
        prompts.append("\n\nHuman: " + " ".join(words) + data.ASSISTANT)
    return prompts

def world_answer(prompt, rng, care=None):
    """A sampled answer: each part (the item's category, its taste, an honest claim, politeness, no filler) is
    the good one with probability 0.2 + 0.7 care, else random; care (uniform in [0, 1] when None) makes careful
    and careless writers, so an answer's parts agree in quality more often than chance. rng: random.Random.
    The answer starts with a space, as after "Assistant:"."""
    request, care = parse_request(prompt), rng.random() if care is None else care
    good = lambda: rng.random() < 0.2 + 0.7 * care  # noqa: E731
    category = request["category"] if good() else rng.choice(CATEGORIES)
    taste = request["like"] if good() else rng.choice(TASTES)
    item = next(name for name, (c, t) in MENU.items() if (c, t) == (category, taste))
    parts = [rng.choice(POLITE[:2]) if good() else rng.choice(RUDE + ("",)), f"Try the {item}."]
    if rng.random() < 0.6:
        parts.append(f"It is {taste if good() else rng.choice(TASTES)}.")
    parts += [] if good() else rng.sample(FILLER, rng.randint(1, 2))
    parts.append("Enjoy!" if good() else "")
    return " " + " ".join(p for p in parts if p)

def human_temperature(gold_gaps, agreement=0.70):
    """The Bradley-Terry temperature T at which noisy humans agree with the gold ranking at the given rate on
    pairs with these gold gaps (ties left out): mean sigmoid(|gap| / T) = agreement, solved by bisection."""
    gaps, lo, hi = np.abs(np.asarray(gold_gaps, dtype=float)), 1e-3, 1e3
    for _ in range(60):  # agreement falls as T grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-gaps[gaps > 0] / mid))) > agreement else (lo, mid)
    return mid

def human_label(gold_a, gold_b, temperature, rng):
    """A noisy human: True (a preferred) with Bradley-Terry probability sigmoid((gold_a - gold_b) / temperature),
    written 0.5 * (1 + tanh(x / 2)) so it cannot overflow. rng: random.Random or a numpy Generator."""
    if temperature <= 0:  # a perfect judge, ties broken at random
        return gold_a > gold_b or (gold_a == gold_b and rng.random() < 0.5)
    return rng.random() < 0.5 * (1.0 + math.tanh((gold_a - gold_b) / (2.0 * temperature)))

# ----------------------------------------------------------------------------- tokenizer
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

def train_tokenizer(texts, vocab_size, out_dir):
    """Train a byte-level BPE tokenizer (decode(encode(x)) == x for any text) on `texts`; write tokenizer.json and
    tokenizer_config.json to out_dir (the HF layout); tok.encode(text) prepends BOS, as Llama's does.
    Returns the tokenizers.Tokenizer with bos_id / eos_id / pad_id set."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("tokenizer.json", tok.to_str()), ("tokenizer_config.json", json.dumps(config, indent=2))):
        atomic_write(os.path.join(out_dir, name), lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    tok.bos_id, tok.eos_id, tok.pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    return tok

# ----------------------------------------------------------------------------- the experiment
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
    ids = [data.encode_prompt(tok, p, 256) for p in prompts]
    greedy = [gold_reward(p, a) for p, a in zip(prompts, generate_answers(model, tok, ids))]
    answers = generate_answers(model, tok, [i for i in ids for _ in range(samples)], temperature=1.0, seed=1)
    sampled = [gold_reward(p, a) for p, a in zip(np.repeat(prompts, samples), answers)]
    return {"greedy": greedy, "sampled": np.reshape(sampled, (-1, samples)).mean(1)}

def build_world(args, device, log):
    """Tokenizer, SFT policy and weak base model pretrained on the world's answers; the pair pool; held-out prompts."""
    rng = random.Random(0)
    corpus = [{"prompt": p, "chosen": world_answer(p, rng)} for p in world_prompts(args.sft_examples, 1)]
    texts = [p["prompt"] + p["chosen"] for p in corpus]
    tok = train_tokenizer(texts, VOCAB_SIZE, os.path.join(args.out, "tokenizer"))
    sft_path, weak_path = os.path.join(args.out, "sft"), os.path.join(args.out, "weak_base")
    for path, size in ((sft_path, POLICY_SIZE), (weak_path, WEAK_SIZE)):  # both: SFT on the same answers
        pretrain(path, tok, corpus, size, device, log)
    prompts = world_prompts(args.pairs + args.eval_prompts, seed=2)
    answers = [(world_answer(p, rng), world_answer(p, rng)) for p in prompts[:args.pairs]]
    pool = [{"prompt": p, "chosen": a, "rejected": b, "gold_margin": gold_reward(p, a) - gold_reward(p, b)}
            for p, (a, b) in zip(prompts, answers)]
    temperature = human_temperature([p["gold_margin"] for p in pool], HUMAN_AGREEMENT)
    sft_rewards = gold_rewards(load_model(sft_path, device=device), tok, prompts[args.pairs:], args.samples)
    return World(tok, sft_path, weak_path, pool, prompts[args.pairs:], sft_rewards, temperature)

def run_seed(seed, world, args, fraction, methods, device, log, progress):
    """One seed: human labels, the split, the annotator and its weak labels, then each method -> results."""
    rng, human = random.Random(seed), []
    for p in world.pool:  # a noisy human keeps or swaps the drawn order
        keep = human_label(p["gold_margin"], 0.0, world.human_temperature, rng)
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
