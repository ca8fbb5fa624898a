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
import shutil
import time
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import formats
import runs
import train_policy
import train_weak
from cwpo import win_rate
from generate import generate_answers
from model import GPT, config_from_hf, load_model, save_model
from runs import atomic_write
from tools.figures import render_figures, results_markdown, write_figures

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
        prompts.append("\n\nHuman: " + " ".join(words) + formats.ASSISTANT)
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

def words(answer):
    return len(str(answer).split())

def human_bias(gold_gaps, length_gaps, agreement=0.70):
    """The length bias b at which humans who prefer the answer with the higher gold reward + b * (its length in
    characters) agree with the gold ranking at the given rate on pairs with these gaps (gold ties left out, a biased
    tie counts half): solved by bisection (each pair's agreement can only fall as b grows). Characters, not words:
    gold gaps are multiples of 0.5, so word gaps would make the agreement jump in steps of several points."""
    gold, length = np.asarray(gold_gaps, dtype=float), np.asarray(length_gaps, dtype=float)
    gold, length, lo, hi = gold[gold != 0], length[gold != 0], 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        agree = np.mean(1 + np.sign(gold + mid * length) * np.sign(gold)) / 2
        lo, hi = (mid, hi) if agree > agreement else (lo, mid)
    return mid

def swapped(pair):
    return dict(pair, chosen=pair["rejected"], rejected=pair["chosen"], gold_margin=-pair["gold_margin"])

def human_labels(pairs, noise, strength, rng):
    """The pairs as noisy humans order them (each kept or swapped). noise "random": Bradley-Terry on the gold gap at
    temperature `strength` (human_label); "systematic": no chance at all, the humans prefer the answer with the
    higher gold reward + strength * (its length in characters), so every error favours the longer answer."""
    def keep(p):
        if noise == "random":
            return human_label(p["gold_margin"], 0.0, strength, rng)
        biased = p["gold_margin"] + strength * (len(p["chosen"]) - len(p["rejected"]))
        return biased > 0 or (biased == 0 and rng.random() < 0.5)
    return [p if keep(p) else swapped(p) for p in pairs]

def shorter_share(pairs):
    """A labeler's length preference: the share of its ordered pairs, among those whose answers differ in length
    (in words), where "chosen" is the shorter answer."""
    gaps = [words(p["chosen"]) - words(p["rejected"]) for p in pairs]
    return float(np.mean([gap < 0 for gap in gaps if gap]))

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
NOISES = ("random", "systematic")  # --study: both kinds of human noise; otherwise random
JUDGE_POOL, JUDGE_LR = 5, 1e-3  # the learned judge: BT on 5 x --pairs pairs of its own, 1 epoch at this lr
CLAIMS = {"CW-DPO minus DPO, human 100 %": ("CW-DPO", REFERENCE),  # the paper's central claim, and weighting
          "CW-DPO minus WS-DPO": ("CW-DPO", "WS-DPO (weak labels, weight 1)")}
POLICY_SIZE, WEAK_SIZE = (3, 96), (2, 64)  # (layers, width) of the strong policy and of the weak annotator
VOCAB_SIZE, PRETRAIN_EPOCHS = 400, 4  # byte-level BPE trained on the world's text; epochs over that text
ANNOTATOR_LR, ANNOTATOR_EPOCHS = 1e-3, 2  # its Bradley-Terry training on the labeled part
HUMAN_AGREEMENT = 0.70  # with gold, as reported between human annotators on HH-RLHF and TL;DR; sets the BT temperature
QUICK = dict(seeds=2, pairs=800, eval_prompts=100, sft_examples=800)  # eval.py --quick; explicit flags win over it
T_975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t quantiles, 1-10 df

def add_args(p):
    """The experiment's flags, on eval.py's parser (`python eval.py` runs the experiment)."""
    positive_int, positive_float = runs.positive_int, runs.positive_float
    p.add_argument("--out", help="output folder (built-in experiment: runs/experiment; GRA: answers.jsonl, "
                   "summary.json)")
    p.add_argument("--quick", action="store_true", help="built-in experiment, smaller (about 2 minutes)")
    p.add_argument("--sweep", action="store_true", help="CW-DPO against DPO at 10 / 20 / 30 %% labels")
    p.add_argument("--study", action="store_true", help="random and systematic (length-biased) human noise")
    p.add_argument("--seeds", type=positive_int, default=5, help="(--quick: 2)")
    p.add_argument("--pairs", type=positive_int, default=2000, help="preference pairs (--quick: 800)")
    p.add_argument("--samples", type=positive_int, help="answers per held-out prompt (4; GRA: 1)")
    p.add_argument("--sft-examples", type=positive_int, default=4000, help="(--quick: 800)")
    p.add_argument("--epochs", type=positive_int, default=1, help="preference optimization epochs")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="preference optimization learning rate")
    p.add_argument("--beta", type=positive_float, default=0.3)
    p.add_argument("--labeled-fraction", type=float, help="(default 0.3; --sweep runs 0.1, 0.2 and 0.3)")
    return p

class World(NamedTuple):
    tok: object
    sft_path: str
    weak_path: str
    pool: list  # {"prompt", "chosen", "rejected", "gold_margin"}: the pairs in drawn order, before any label
    held_out: list  # prompts
    sft_answers: dict  # the SFT model's answers to held_out (policy_answers)
    noise: str = "random"  # the humans' (NOISES)
    human_strength: float = 0.0  # their BT temperature (random) or length bias (systematic), from HUMAN_AGREEMENT
    judge: tuple = None  # the learned gold judge and the flags it scores with (train_judge)

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
        train_policy.add_reference_logps(model, examples, 256, device)
    objective = train_policy.objective_of(args)
    return train_policy.train(model, examples, args, objective, device=device, log=log), args

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

def policy_answers(model, tok, prompts, samples):
    """The greedy answer to each prompt [P] and `samples` answers sampled at temperature 1 [P * samples]."""
    ids = [data.encode_prompt(tok, p, 256) for p in prompts]
    return {"greedy": generate_answers(model, tok, ids),
            "sampled": generate_answers(model, tok, [i for i in ids for _ in range(samples)], temperature=1.0, seed=1)}

def mean_gold(prompts, answers):
    """The program's mean gold reward per prompt [P] of answers [P * S] (each prompt's S answers in a row)."""
    samples = len(answers) // len(prompts)
    rewards = [gold_reward(p, a) for p, a in zip(np.repeat(prompts, samples), answers)]
    return np.reshape(rewards, (len(prompts), samples)).mean(1)

def judged_gra(judge, tok, prompts, answers, sft_answers, args, device, seed=0):
    """GRA under a learned judge: its score of each answer [P * S] (each prompt's S answers in a row), averaged per
    prompt, the policy's against the SFT model's (cwpo.win_rate). Scored as pairs (policy, SFT) in one batched pass."""
    samples = len(answers) // len(prompts)
    pairs = [{"prompt": p, "chosen": a, "rejected": b}
             for p, a, b in zip(np.repeat(prompts, samples), answers, sft_answers)]
    scores = train_weak.score_pairs(judge, tok, pairs, args, device, log=lambda _: None)
    return win_rate(*(s.view(len(prompts), samples).mean(1).numpy() for s in scores), seed=seed)

def train_judge(world, args, device, log):
    """The paper's kind of gold judge: a reward model of the policy's size (from the SFT model), trained once per
    world with BT on JUDGE_POOL x --pairs pairs of its own (prompts and answers drawn apart from the experiment's),
    labeled as the world's humans label. -> ((model, flags it scores with), report on the experiment's pool)."""
    rng = random.Random(3)
    prompts = world_prompts(JUDGE_POOL * args.pairs, seed=3)
    pairs = [{"prompt": p, "chosen": a, "rejected": b, "gold_margin": gold_reward(p, a) - gold_reward(p, b)}
             for p, a, b in ((p, world_answer(p, rng), world_answer(p, rng)) for p in prompts)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        (judge, _), jargs = train(None, world.tok, human_labels(pairs, world.noise, world.human_strength, rng),
                                  world.sft_path, os.path.join(args.out, f"judge-{world.noise}"), device, log,
                                  objective="bt", lr=JUDGE_LR, epochs=1)
    vars(jargs).update(max_answer_len=64, batch_size=256)  # it scores whole generated answers (64 new tokens)
    first, second = train_weak.score_pairs(judge, world.tok, world.pool, jargs, device, log=lambda _: None)
    ranked = [p if a > b else swapped(p) for p, a, b in zip(world.pool, first.tolist(), second.tolist())]
    report = {"vs_gold": float(np.mean([p["gold_margin"] > 0 for p in ranked if p["gold_margin"]])),
              "shorter": shorter_share(ranked), "pairs": len(pairs)}
    return (judge, jargs), report

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
    sft_answers = policy_answers(load_model(sft_path, device=device), tok, prompts[args.pairs:], args.samples)
    return World(tok, sft_path, weak_path, pool, prompts[args.pairs:], sft_answers)

def with_humans(world, noise, args, device, log):
    """The world with humans of this noise, tuned to HUMAN_AGREEMENT, and its learned judge trained on their labels."""
    gaps = [p["gold_margin"] for p in world.pool]
    strength = human_temperature(gaps, HUMAN_AGREEMENT) if noise == "random" else human_bias(
        gaps, [len(p["chosen"]) - len(p["rejected"]) for p in world.pool], HUMAN_AGREEMENT)
    world = world._replace(noise=noise, human_strength=strength)
    judge, report = train_judge(world, args, device, log)
    gold_ranked = [p if p["gold_margin"] > 0 else swapped(p) for p in world.pool if p["gold_margin"]]
    report.update(gold_shorter=shorter_share(gold_ranked), sft_words=float(np.mean(
        [words(a) for a in world.sft_answers["sampled"]])), human_strength=strength)
    log(f"{noise} humans: strength {strength:.3f}; learned judge vs gold {report['vs_gold']:.3f}")
    return world._replace(judge=judge), report

def run_seed(seed, world, args, fraction, methods, device, log, progress):
    """One seed: human labels, the split, the annotator and its weak labels, then each method -> results."""
    human = human_labels(world.pool, world.noise, world.human_strength, random.Random(seed))
    labeled, unlabeled, _ = data.split_pairs(human, fraction, 0, seed)
    out = os.path.join(args.out, f"seed{seed}")
    with torch.random.fork_rng(devices=[]):  # the fresh scalar head from the seed, not from what ran before
        torch.manual_seed(seed)
        (rm, tok), wargs = train(None, world.tok, labeled, world.weak_path, out + "/weak", device, log,
                                 objective="bt", lr=ANNOTATOR_LR, epochs=ANNOTATOR_EPOCHS, seed=seed)
    weak = train_weak.weak_labels(unlabeled, *train_weak.score_pairs(rm, tok, unlabeled, wargs, device))
    # the annotator is right when it agrees with the gold ranking (gold ties left out)
    ranked = [(w["confidence"], int((u["gold_margin"] > 0) == bool(w["human_agrees"])))
              for u, w in zip(unlabeled, weak) if u["gold_margin"]]
    result = {"annotator_vs_gold": train_weak.annotator_report(*zip(*ranked)), "methods": {},
              "human_vs_gold": float(np.mean([h["gold_margin"] > 0 for h in human if h["gold_margin"]])),
              "shorter": {"annotator": shorter_share(weak), "humans": shorter_share(human)}}
    progress(seed, f"{world.noise} humans | annotator trained")
    sets, (judge, judge_args) = {"human_pool": labeled + unlabeled, "labeled": labeled, "weak": weak}, world.judge
    for name in methods:
        (subset, options), policy = METHODS[name], load_model(world.sft_path, device=device)
        train(policy, tok, sets[subset], world.sft_path, out + "/policy", device, log, lr=args.lr, beta=args.beta,
              epochs=args.epochs, seed=seed, **options)
        answers, sft = policy_answers(policy, tok, world.held_out, args.samples), world.sft_answers
        gold, greedy = ([mean_gold(world.held_out, a[kind]) for a in (answers, sft)] for kind in ("sampled", "greedy"))
        judged = judged_gra(judge, tok, world.held_out, answers["sampled"], sft["sampled"], judge_args, device, seed)
        result["methods"][name] = dict(win_rate(*gold, seed=seed), gra_greedy=win_rate(*greedy)["gra"],
                                       gra_judge=judged["gra"], mean_reward=float(gold[0].mean()),
                                       words=float(np.mean([words(a) for a in answers["sampled"]])),
                                       pairs=len(sets[subset]))
        progress(seed, f"{world.noise} humans | {name}: GRA {result['methods'][name]['gra']:.1f} %, learned judge "
                       f"{judged['gra']:.1f} %")
    return result

def interval(values):
    """Mean and the half-width of its 95 % t-interval over seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:  # one seed gives no interval (nan: null in results.json)
        return float(values.mean()), math.nan
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

def paired(seeds, a, b, key="gra"):
    """Method a minus method b, paired by seed: (mean, lo, hi) of its 95 % t-interval."""
    diff, half = interval([s["methods"][a][key] - s["methods"][b][key] for s in seeds])
    return diff, diff - half, diff + half

def summarize(seeds, methods, key="gra"):
    """Per method: mean GRA (`key`: "gra" under the program, "gra_judge" under the learned judge) with its 95 %
    t-interval over seeds, and the paired difference to REFERENCE."""
    rows = {}
    for name in methods:
        gra = [s["methods"][name][key] for s in seeds]
        (mean, half), (diff, lo, hi) = interval(gra), paired(seeds, name, REFERENCE, key)
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"
        verdict = verdict if len(seeds) > 1 else ""  # one seed: no interval, so no verdict (null bounds in JSON)
        rows[name] = {"gra": mean, "lo": mean - half, "hi": mean + half, "diff": diff, "diff_lo": lo, "diff_hi": hi,
                      "verdict": verdict if name != REFERENCE else "", "per_seed": gra,
                      **{k: float(np.mean([s["methods"][name][k] for s in seeds])) for k in ("gra_greedy", "words")}}
    return rows

def claims(seeds, methods):
    """The paper's claims of CLAIMS under each judge: the paired difference and "supported" (its interval above 0),
    "contradicted" (below 0) or "cannot decide"."""
    out = {}
    for judge, key in (("program", "gra"), ("learned", "gra_judge")):
        for claim, (a, b) in CLAIMS.items():
            if a in methods and b in methods:
                diff, lo, hi = paired(seeds, a, b, key)
                verdict = "supported" if lo > 0 else "contradicted" if hi < 0 else "cannot decide"
                verdict = verdict if len(seeds) > 1 else ""
                out[f"{claim} ({judge} judge)"] = {"diff": diff, "lo": lo, "hi": hi, "verdict": verdict}
    return out

def finite_or_null(value):
    """value with every NaN or infinity replaced by None: null in JSON, where a bare NaN is not valid."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return (float(value) if math.isfinite(value) else None) if isinstance(value, (float, np.floating)) else value

def clear_outputs(out):
    """Remove what an earlier experiment wrote into `out`, so that a failed or stopped run never leaves an old
    results.json beside new models; other files stay."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name in ("tokenizer", "sft", "weak_base") or re.fullmatch(r"seed\d+", name):
            shutil.rmtree(os.path.join(out, name))
        elif re.fullmatch(r"results\.(json|md)|(reliability|gra|gra-judge)-\d+(-systematic)?\.svg", name):
            os.remove(os.path.join(out, name))

def experiment(args):
    t0, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    if args.sweep and args.labeled_fraction is not None:  # checked before any work, as each flag below
        raise ValueError("--sweep sets the labeled fractions itself (10 / 20 / 30 %): leave out --labeled-fraction")
    fraction = 0.3 if args.labeled_fraction is None else args.labeled_fraction  # eval.py's default
    runs = [(f, SWEEP) for f in (0.1, 0.2, 0.3)] if args.sweep else [(fraction, tuple(METHODS))]
    for fraction, _ in runs:  # checked before any work: the annotator needs labeled pairs, and pairs to label
        if not 1 <= round(fraction * args.pairs) < args.pairs:
            raise ValueError(f"--labeled-fraction {fraction} of --pairs {args.pairs} leaves no labeled or no "
                             "unlabeled pair")
    clear_outputs(args.out)
    base = build_world(args, device, log)
    log(f"world: {len(base.pool)} pairs, {len(base.held_out)} prompts")
    noises = NOISES if args.study else NOISES[:1]
    units, done, t_start = len(noises) * args.seeds * sum(len(m) + 1 for _, m in runs), [0], time.time()

    def progress(seed, what):
        done[0] += 1
        eta = (time.time() - t_start) / done[0] * (units - done[0])
        log(f"seed {seed + 1} of {args.seeds} | step {done[0]} of {units} | {what} | ETA {eta / 60:.1f} min")

    results = {"args": vars(args), "runs": []}
    for noise in noises:
        world, judge = with_humans(base, noise, args, device, log)
        for fraction, methods in runs:
            seeds = [run_seed(s, world, args, fraction, methods, device, log, progress) for s in range(args.seeds)]
            results["runs"].append({"labeled_fraction": fraction, "noise": noise, "judge": judge, "seeds": seeds,
                                    "summary": summarize(seeds, methods), "checks": world_checks(seeds),
                                    "summary_judge": summarize(seeds, methods, "gra_judge"),
                                    "claims": claims(seeds, methods)})
    results["seconds"] = time.time() - t0
    results = finite_or_null(results)
    text, figures = results_markdown(results, REFERENCE), render_figures(results)  # all drawn before any is written
    print("\n" + text)
    atomic_write(os.path.join(args.out, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(text + "\n"))
    atomic_write(os.path.join(args.out, "results.json"), lambda tmp: pathlib.Path(tmp).write_text(
        json.dumps(results, indent=1, default=float, allow_nan=False)))
    write_figures(figures, args.out)
