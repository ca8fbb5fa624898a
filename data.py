"""Data for CW-PO: loaders, the labeled / unlabeled / held-out split, the one tokenization path and batch
layout (see collate), and the built-in synthetic world whose gold reward is a program."""
import gzip
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSISTANT = "\n\nAssistant:"

# ----------------------------------------------------------------------------- loaders
def _field(record, key, kind=str, name=None):
    """record[key], checked to be of type `kind`; a ValueError naming the key otherwise."""
    name = name or key
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"missing key {name!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"key {name!r} has type {type(value).__name__}")
    return value

def _numeric_extras(record, used):
    """Numbers riding along a pair (e.g. the confidence train_weak.py writes), kept as they are; a confidence must
    be a number in [0, 1]."""
    if "confidence" in record and not (type(record["confidence"]) in (int, float) and 0 <= record["confidence"] <= 1):
        raise ValueError(f"key 'confidence' must be a number in [0, 1], got {record['confidence']!r}")
    return {k: v for k, v in record.items() if k not in used and type(v) in (int, float)}

def _hh(record):
    """Anthropic HH-RLHF: two transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is their longest shared
    prefix cut after its last "\\n\\nAssistant:", the answers what follows (leading space kept: " I'm sorry...").
    That is the chosen transcript up to its last "\\n\\nAssistant:" when both end in the same final turn; when they
    do not (5 of the 2,312 records of harmless-base test), both answers still reply to the same prompt."""
    chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT not in text:
            raise ValueError(f"key {key!r}: an HH-RLHF transcript needs '\\n\\nAssistant:' (a record of prompt / "
                             "chosen / rejected needs the key 'prompt')")
    shared = os.path.commonprefix([chosen, rejected])
    if ASSISTANT not in shared:
        raise ValueError("keys 'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:'")
    prompt = shared[: shared.rindex(ASSISTANT) + len(ASSISTANT)]
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}

def _tldr(record):
    """OpenAI TL;DR comparisons: a Reddit post, two summaries and the index of the preferred one."""
    info, summaries, choice = (_field(record, k, t) for k, t in (("info", dict), ("summaries", list), ("choice", int)))
    if len(summaries) != 2 or choice not in (0, 1):
        raise ValueError("key 'summaries' must hold 2 summaries and key 'choice' be 0 or 1")
    texts = [" " + _field(s, "text", name=f"summaries[{i}].text").strip() for i, s in enumerate(summaries)]
    prompt = (f"SUBREDDIT: r/{_field(info, 'subreddit', name='info.subreddit')}\n"
              f"TITLE: {_field(info, 'title', name='info.title')}\n"
              f"POST: {_field(info, 'post', name='info.post')}\nTL;DR:")
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}

def _answer_text(record, key):
    """record[key] as (answer, the chat messages before it); a chat-message list must end in the assistant's answer."""
    value = _field(record, key, (str, list))
    if isinstance(value, str):
        return value, []
    last = value[-1] if value and all(isinstance(m, dict) for m in value) else {}
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise ValueError(f"key {key!r}: a chat-message list must end in an assistant message with string content")
    return last["content"], value[:-1]

def _pairs(record):
    """{"prompt", "chosen", "rejected"}; UltraFeedback-binarized style answers may be chat-message lists. Without
    a "prompt" key the prompt is the content of the messages before the final assistant message."""
    (chosen, history), (rejected, _) = _answer_text(record, "chosen"), _answer_text(record, "rejected")
    if "prompt" in record or not history:
        prompt = _field(record, "prompt")
    else:
        prompt = "\n\n".join(_field(m, "content", name="chosen[].content") for m in history)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **_numeric_extras(record, ("prompt", "chosen", "rejected"))}

def _unlabeled(record):
    """{"prompt", "answer_a", "answer_b"}: a pair without a label."""
    keys = ("prompt", "answer_a", "answer_b")
    return {**{k: _field(record, k) for k in keys}, **_numeric_extras(record, keys)}

PARSERS = {"hh": _hh, "tldr": _tldr, "ufb": _pairs, "pairs": _pairs, "unlabeled": _unlabeled}

def detect_format(record):
    """The format of a record, told from its keys."""
    keys = set(record)
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"answer_a", "answer_b"} <= keys:
        return "unlabeled"
    if {"chosen", "rejected"} <= keys:
        return "hh" if "prompt" not in keys and isinstance(record["chosen"], str) else "pairs"
    raise ValueError(f"cannot tell the format from keys {sorted(keys)}; pass fmt= one of {tuple(PARSERS)}")

def load_pairs(path, fmt="auto", skip_bad=False):
    """Read preference pairs from a .jsonl or .jsonl.gz file: a list of {"prompt", "chosen", "rejected"} dicts
    ({"prompt", "answer_a", "answer_b"} for fmt="unlabeled"). fmt "auto" takes the format of the first record.
    A malformed record raises ValueError naming the file, the 1-based line and the key; with skip_bad=True it
    is skipped instead and one line on stderr says how many were. Blank lines are not records."""
    if fmt != "auto" and fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {tuple(PARSERS)}")
    opener = gzip.open if str(path).endswith(".gz") else open
    pairs, n_bad, first_bad = [], 0, None
    with opener(path, "rb") as f:
        for lineno, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))  # bad JSON and bad UTF-8 are ValueErrors too
                if not isinstance(record, dict):
                    raise ValueError("a record must be a JSON object")
                if fmt == "auto":
                    fmt = detect_format(record)
                pairs.append(PARSERS[fmt](record))
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path}, line {lineno}: {e}") from None
                n_bad += 1
                first_bad = first_bad or f"line {lineno}: {e}"
    if n_bad:
        print(f"load_pairs: skipped {n_bad} malformed record(s) in {path} (first: {first_bad})", file=sys.stderr)
    if not pairs:
        raise ValueError(f"{path}: no records" + (f" ({n_bad} malformed skipped)" if n_bad else ""))
    n_same = sum(p.get("chosen", 0) == p.get("rejected", 1) for p in pairs)
    if n_same:  # no gradient: DPO trains them at a constant log 2
        print(f"load_pairs: {n_same} pair(s) in {path} have identical chosen and rejected answers", file=sys.stderr)
    return pairs

def _lines(f, path):
    """(1-based line number, line) of an open file; a truncated or corrupt .gz raises a ValueError naming it."""
    try:
        yield from enumerate(f, 1)
    except (EOFError, OSError) as e:  # gzip's EOFError, BadGzipFile
        raise ValueError(f"{path}: unreadable ({e})") from None

def split_pairs(pairs, labeled_fraction, eval_size, seed):
    """Split pairs into (labeled, unlabeled, heldout): disjoint, covering all, each in file order. eval_size is a
    count (int) or a fraction of all pairs (float). One seeded permutation decides everything: its first eval_size
    entries are held out and the labeled set is the first labeled_fraction of the rest, so for one seed the 20 %
    labeled set lies inside the 30 % one and label fractions compare fairly."""
    n = len(pairs)
    n_eval = round(eval_size * n) if isinstance(eval_size, float) else int(eval_size)
    if not (0.0 <= labeled_fraction <= 1.0 and 0 <= n_eval <= n):
        raise ValueError(f"bad split of {n} pairs: labeled_fraction={labeled_fraction}, eval_size={eval_size}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_labeled = round(labeled_fraction * (n - n_eval))
    parts = order[n_eval: n_eval + n_labeled], order[n_eval + n_labeled:], order[:n_eval]
    return tuple([pairs[i] for i in sorted(part)] for part in parts)

# ----------------------------------------------------------------------------- tokenization and batches
def encode_prompt(tok, prompt, max_len):
    """Prompt ids with the tokenizer's special tokens (BOS), truncated from the LEFT so the end of the prompt,
    next to the answer, survives; a leading BOS is kept when truncating."""
    ids = tok.encode(prompt).ids
    if len(ids) <= max_len:
        return ids
    bos = ids[:1] if ids[0] == tok.bos_id and max_len > 1 else []
    return bos + ids[len(ids) - max_len + len(bos):]

def encode_answer(tok, answer, max_len):
    """Answer ids without special tokens, plus EOS, truncated from the RIGHT (a truncated answer loses its EOS)."""
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no EOS token (tok.eos_id is None)")
    return (tok.encode(answer, add_special_tokens=False).ids + [tok.eos_id])[:max_len]

def encode_prompt_answer(tok, prompt, answer, max_prompt_len, max_answer_len):
    """One sequence (SFT, reward scoring): {"prompt_ids", "answer_ids"}."""
    return {"prompt_ids": encode_prompt(tok, prompt, max_prompt_len),
            "answer_ids": encode_answer(tok, answer, max_answer_len)}

def encode_pair(tok, prompt, chosen, rejected, max_prompt_len, max_answer_len):
    """One preference pair: {"prompt_ids", "chosen_ids", "rejected_ids"}."""
    return {"prompt_ids": encode_prompt(tok, prompt, max_prompt_len),
            "chosen_ids": encode_answer(tok, chosen, max_answer_len),
            "rejected_ids": encode_answer(tok, rejected, max_answer_len)}

def collate(examples, pad_id, weights=None):
    """Batch encoded examples in the one layout every script uses. For B pairs (encode_pair): input_ids,
    attention_mask, completion_mask [2B, T] long, rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected,
    right-padded with pad_id; completion_mask is 1 on answer tokens (the appended EOS included). Single
    sequences (encode_prompt_answer) give [B, T]. weight [B] float: `weights`, else each example's "weight", else 1."""
    if pad_id is None:
        raise ValueError("collate needs a pad id (tok.pad_id is None)")
    if "chosen_ids" in examples[0]:
        prompts = [ex["prompt_ids"] for ex in examples] * 2
        answers = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    else:
        prompts = [ex["prompt_ids"] for ex in examples]
        answers = [ex["answer_ids"] for ex in examples]
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    pads = [[0] * (T - len(p) - len(a)) for p, a in zip(prompts, answers)]
    input_ids = [p + a + [pad_id] * len(pad) for p, a, pad in zip(prompts, answers, pads)]
    attention_mask = [[1] * (len(p) + len(a)) + pad for p, a, pad in zip(prompts, answers, pads)]
    completion_mask = [[0] * len(p) + [1] * len(a) + pad for p, a, pad in zip(prompts, answers, pads)]
    if weights is None:
        weights = [ex.get("weight", 1.0) for ex in examples]
    weight = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if len(weight) != len(examples):
        raise ValueError(f"{len(weight)} weights for {len(examples)} examples")
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "completion_mask": torch.tensor(completion_mask), "weight": weight}

def iterate_batches(examples, batch_size, seed=None):
    """Yield lists of batch_size examples (the last one may be shorter); shuffled by `seed` when given."""
    order = np.arange(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start: start + batch_size]]

# ----------------------------------------------------------------------------- the built-in world
# A person asks the assistant for a snack, a drink or a dinner, says what taste they like and hate, their
# budget, and sometimes asks for a short answer. The answer recommends an item of a fixed menu and may state
# its taste and price (truthfully or not), politely or rudely. gold_reward reads both and judges.

ATTRIBUTES = ("sweet", "salty", "spicy", "sour", "creamy", "cold")
MENU = {  # item: (category, tastes, price in dollars)
    "salted pretzels": ("snack", {"salty"}, 2), "chili chips": ("snack", {"spicy", "salty"}, 3),
    "caramel popcorn": ("snack", {"sweet"}, 4), "lemon candy": ("snack", {"sour", "sweet"}, 1),
    "cheese toast": ("snack", {"salty", "creamy"}, 5), "fruit yogurt": ("snack", {"sweet", "creamy", "cold"}, 4),
    "pickled cucumbers": ("snack", {"sour", "salty"}, 2), "ice pops": ("snack", {"sweet", "cold"}, 1),
    "spicy nuts": ("snack", {"spicy", "salty"}, 6),
    "hot chocolate": ("drink", {"sweet", "creamy"}, 4), "lemonade": ("drink", {"sour", "sweet", "cold"}, 3),
    "ginger tea": ("drink", {"spicy"}, 2), "iced coffee": ("drink", {"cold", "creamy"}, 5),
    "tomato juice": ("drink", {"salty", "sour"}, 3), "mango shake": ("drink", {"sweet", "creamy", "cold"}, 6),
    "chai latte": ("drink", {"spicy", "sweet", "creamy"}, 5), "sparkling water": ("drink", {"cold"}, 1),
    "chicken curry": ("dinner", {"spicy", "creamy"}, 9), "tomato soup": ("dinner", {"sour", "salty"}, 5),
    "cheese pasta": ("dinner", {"creamy", "salty"}, 7), "pepper steak": ("dinner", {"spicy", "salty"}, 12),
    "sushi rolls": ("dinner", {"sour", "cold", "salty"}, 10), "honey chicken": ("dinner", {"sweet", "salty"}, 8),
    "noodle salad": ("dinner", {"cold", "sour"}, 6), "veggie tacos": ("dinner", {"spicy"}, 6),
}
BUDGETS = {"snack": (2, 6), "drink": (2, 6), "dinner": (6, 12)}
ASK = ("I want a {} for tonight.", "Can you suggest a {}?", "I am looking for a good {}.", "What {} should I get?")
LIKE = ("I like {} food.", "I love {} things.", "I am in the mood for something {}.")
DISLIKE = ("I hate {} food.", "I can't stand {} things.", "Please nothing {}.")
BUDGET = ("I have {} dollars.", "My budget is {} dollars.", "I can spend {} dollars at most.")
BRIEF = ("Please keep it short.", "Keep it brief.")
POLITE = ("Sure!", "Happy to help!", "Good question!", "Of course.")
RUDE = ("Ugh, fine.", "Whatever.", "Figure it out yourself.")
SUGGEST = ("Try the {}.", "I suggest the {}.", "You should get the {}.", "How about the {}?")
FILLER = ("Many people like it.", "It is very popular.", "You can find it anywhere.", "I think it is a good one.")
CLOSE = ("Enjoy!", "Hope this helps!", "Have a nice day!")
NO_ITEM = ("I do not know what to get.", "Maybe just stay at home.", "I can not help with that.")
POLITE_WORDS = re.compile(r"\b(sure|happy to help|of course|good question|enjoy|hope this helps|nice day)\b")
RUDE_WORDS = re.compile(r"\b(ugh|whatever|figure it out)\b")

def parse_request(prompt):
    """What the person asks for: {"category", "like", "dislike", "budget", "brief"} (None where not said)."""
    text = prompt.rsplit("Human:", 1)[-1].lower()
    def word(pattern, allowed):
        found = re.search(pattern, text)
        return found.group(1) if found and found.group(1) in allowed else None
    budget = re.search(r"\b(\d{1,3}) dollars", text)
    return {"category": word(r"\b(snack|drink|dinner)\b", BUDGETS),
            "like": word(r"\b(?:like|love|mood for something) (\w+)", ATTRIBUTES),
            "dislike": word(r"\b(?:hate|can't stand|nothing) (\w+)", ATTRIBUTES),
            "budget": int(budget.group(1)) if budget else None, "brief": bool(re.search(r"\b(short|brief)\b", text))}

def _fit(request, item):
    """How well a menu item meets the request: the content part of the gold reward."""
    category, tastes, price = MENU[item]
    score = 1.0 if category == request["category"] else -1.5
    score += 1.5 * (request["like"] in tastes) - 2.0 * (request["dislike"] in tastes)
    if request["budget"] is not None:
        score += 0.5 if price <= request["budget"] else -1.0 - 0.2 * (price - request["budget"])
    return score

def gold_reward(prompt, answer):
    """The world's gold judge: a deterministic program reading the prompt and the answer; never raises on a string.
    r = fit(request, first item named)       category +1 / -1.5, liked taste +1.5, hated taste -2,
                                             within budget +0.5 / over -(1 + 0.2 * dollars over); no item: -2
        - 0.5 * (other items named)          hedging between several items
        - 0.75 * (false taste claims)        "It is sweet" / "not spicy" checked against the item's real tastes
        - 0.5 * [a stated price is wrong]
        + 0.25 * [polite] - 1.0 * [rude]
        - 0.4 * max(0, sentences - 3) if the person asked for a short answer, else 0.1 * max(0, sentences - 5)
    """
    request, text = parse_request(prompt), str(answer).lower()
    found = sorted((m.start(), item) for item in MENU for m in re.finditer(r"\b" + item + r"\b", text))
    items = list(dict.fromkeys(item for _, item in found))  # distinct, in order of appearance
    if not items:
        reward = -2.0
    else:
        item, (_, tastes, price) = items[0], MENU[items[0]]
        reward = _fit(request, item) - 0.5 * (len(items) - 1)
        for negated, taste in re.findall(r"\b(not )?(" + "|".join(ATTRIBUTES) + r")\b", text):
            reward -= 0.75 * ((taste in tastes) == bool(negated))
        stated = re.search(r"\b(\d{1,3}) dollars", text)
        reward -= 0.5 * bool(stated and int(stated.group(1)) != price)
    reward += 0.25 * bool(POLITE_WORDS.search(text)) - 1.0 * bool(RUDE_WORDS.search(text))
    sentences = len([s for s in re.split(r"[.!?]+", text) if s.strip()])
    reward -= 0.4 * max(0, sentences - 3) if request["brief"] else 0.1 * max(0, sentences - 5)
    return float(reward)

def world_prompts(n, seed):
    """n requests in HH-RLHF form "\\n\\nHuman: ...\\n\\nAssistant:"."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        category = rng.choice(sorted(BUDGETS))
        like, dislike = rng.sample(ATTRIBUTES, 2)
        budget = rng.randint(*BUDGETS[category])
        wishes = [rng.choice(templates).format(value) for chance, templates, value in
                  ((0.9, LIKE, like), (0.8, DISLIKE, dislike), (0.8, BUDGET, budget)) if rng.random() < chance]
        rng.shuffle(wishes)
        if rng.random() < 0.3:
            wishes.append(rng.choice(BRIEF))
        prompts.append("\n\nHuman: " + " ".join([rng.choice(ASK).format(category)] + wishes) + ASSISTANT)
    return prompts

def world_answer(prompt, rng, quality=None):
    """An answer of random quality ("good", "mediocre" or "bad"; drawn 40/35/25 % when None), the SFT corpus.
    The quality sets which menu items are picked (the 2 best for the request, the next 8, or the rest) and how
    likely the answer is honest, polite and concise; each part still varies, so content and style can conflict.
    rng is a random.Random. The answer starts with a space, as after "Assistant:"."""
    request = parse_request(prompt)
    quality = quality or rng.choices(("good", "mediocre", "bad"), weights=(0.40, 0.35, 0.25))[0]
    honest, polite, rude, fillers = {"good": (0.9, 0.7, 0.05, (0, 0, 1)), "mediocre": (0.7, 0.5, 0.15, (0, 1, 2)),
                                     "bad": (0.4, 0.3, 0.35, (0, 1, 2, 3))}[quality]
    ranked = sorted(MENU, key=lambda item: -_fit(request, item))  # stable: ties keep menu order
    pool = {"good": ranked[:2], "mediocre": ranked[2:10], "bad": ranked[10:]}[quality]
    item = rng.choice(pool + [None] * (quality == "bad"))  # a bad answer may name no item at all
    parts = [rng.choice(POLITE)] if rng.random() < polite else [rng.choice(RUDE)] if rng.random() < rude else []
    if item is None:
        parts.append(rng.choice(NO_ITEM))
    else:
        parts.append(rng.choice(SUGGEST).format(item))
        parts.append(_taste_claim(request, item, rng.random() < honest, rng))
        if rng.random() < 0.6:
            price = MENU[item][2] if rng.random() < honest else MENU[item][2] + rng.choice((1, 2, 3))
            parts.append(f"It costs {price} dollars.")
    parts += [rng.choice(FILLER) for _ in range(rng.choice(fillers))]
    parts += [rng.choice(CLOSE)] if rng.random() < polite else [rng.choice(RUDE)] if rng.random() < rude else []
    if request["brief"] and rng.random() < honest:  # a careful writer heeds "keep it short"
        parts = parts[:3]
    return " " + " ".join(parts)

def _taste_claim(request, item, honest, rng):
    """ "It is sweet and not spicy." An honest claim names real tastes (the liked one first); a dishonest one
    flatters the request: it claims the liked taste the item lacks and denies the hated taste it has."""
    tastes = MENU[item][1]
    like, dislike = request["like"], request["dislike"]
    if honest:
        words = rng.sample(sorted(tastes - {like}), len(tastes - {like}))  # a random order of the other tastes
        words = (([like] if like in tastes else []) + words)[:2]
        if dislike and dislike not in tastes and rng.random() < 0.5:
            words = words[:1] + [f"not {dislike}"]
    else:
        words = ([like] if like and like not in tastes else []) + ([f"not {dislike}"] if dislike in tastes else [])
        words = words or [rng.choice(sorted(set(ATTRIBUTES) - tastes))]
    return f"It is {' and '.join(words)}."

# Chosen so that about 70 % of human labels agree with the gold ranking (the agreement reported between human
# annotators on HH-RLHF and TL;DR) on pairs of two world_answer samples for one world prompt, gold ties left out:
# mean over such pairs of sigmoid(|g_a - g_b| / T) = 0.70 (see tests/test_data.py). Not tuned for any method.
DEFAULT_HUMAN_TEMPERATURE = 3.0

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
        with open(os.path.join(out_dir, name + ".tmp"), "w", encoding="utf-8") as f:  # atomic: write, then rename
            f.write(text)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    tok.bos_id, tok.eos_id, tok.pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    return tok
