"""Data for CW-PO: loaders, the labeled / unlabeled / held-out split, the one tokenization path and batch
layout (see collate), and the built-in synthetic world whose gold reward is a program."""
import gzip
import json
import math
import os
import pathlib
import random
import re
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model import atomic_write

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
    """Batch encoded examples in the one layout every script uses: each prompt is computed once, its answer(s)
    follow it, and examples are packed into rows as long as the longest example (first fit, longest first), so
    little padding is computed. A row holding pair 0 (prompt p0, chosen c0, rejected r0) and pair 1:

        input_ids     p0 p0 p0 c0 c0 r0 r0 r0 | p1 p1 c1 c1 c1 r1 | pad
        position_ids   0  1  2  3  4  3  4  5 |  0  1  2  3  4  2 |  0    each answer continues its prompt
        segment_ids    0  0  0  0  0  0  0  0 |  1  1  1  1  1  1 | -1    the example; -1 a pad
        branch_ids     0  0  0  1  1  2  2  2 |  0  0  1  1  1  2 |  0    0 prompt, 1 chosen, 2 rejected

    A token attends to the earlier tokens of its own example that lie in the prompt or in its own branch
    (model.visible): the rejected answer never sees the chosen one, and each answer's log-probs are those of
    prompt + answer alone. The first token of each answer is predicted from the prompt's last position, so the
    tokens to score are listed explicitly, grouped by answer in order (answer a = pair i's chosen i, its
    rejected B + i; for single sequences, encode_prompt_answer, answer i):
      score_index  [N] long  flat index (row * T + column) of the hidden state that predicts the token
      score_target [N] long  the token id;   score_answer [N] long  its answer
      last_index   [A] long  flat index of each answer's last token (the reward model's score is read there)
    With input_ids, position_ids, segment_ids, branch_ids [R, T] long and weight [B] float: `weights`, else each
    example's "weight", else 1. An answer's first token has no predictor, and is not scored, after an empty prompt.
    """
    if pad_id is None:
        raise ValueError("collate needs a pad id (tok.pad_id is None)")
    keys = ("chosen_ids", "rejected_ids") if "chosen_ids" in examples[0] else ("answer_ids",)
    lengths = [len(ex["prompt_ids"]) + sum(len(ex[k]) for k in keys) for ex in examples]
    T, rows, room = max(lengths), [], []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(T)
        rows[r].append(i)
        room[r] -= lengths[i]
    layout = {name: [[fill] * T for _ in rows] for name, fill in
              (("input_ids", pad_id), ("position_ids", 0), ("segment_ids", -1), ("branch_ids", 0))}

    def put(r, column, ids, first_position, segment, branch):
        for j, token in enumerate(ids):
            for name, value in (("input_ids", token), ("position_ids", first_position + j), ("segment_ids", segment),
                                ("branch_ids", branch)):
                layout[name][r][column + j] = value

    scored = [[] for _ in range(len(keys) * len(examples))]  # per answer: (score_index, score_target)
    last_index = [0] * len(scored)
    for r, row in enumerate(rows):
        column = 0
        for i in row:
            prompt = examples[i]["prompt_ids"]
            put(r, column, prompt, 0, i, 0)
            at = column + len(prompt)  # where the next answer starts
            for b, key in enumerate(keys):
                answer, a = examples[i][key], b * len(examples) + i
                put(r, at, answer, len(prompt), i, b + 1)
                flat = lambda t: r * T + (column + t if t < len(prompt) else at + t - len(prompt))  # noqa: E731
                # position t of prompt + answer predicts token t + 1
                scored[a] = [(flat(len(prompt) + j - 1), token) for j, token in enumerate(answer) if len(prompt) + j]
                last_index[a] = flat(len(prompt) + len(answer) - 1)
                at += len(answer)
            column = at
    if weights is None:
        weights = [ex.get("weight", 1.0) for ex in examples]
    weight = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if len(weight) != len(examples):
        raise ValueError(f"{len(weight)} weights for {len(examples)} examples")
    flat_scored = [(index, target, a) for a, tokens in enumerate(scored) for index, target in tokens]
    score_index, score_target, score_answer = zip(*flat_scored) if flat_scored else ((), (), ())
    return {**{name: torch.tensor(value) for name, value in layout.items()},
            "score_index": torch.tensor(score_index, dtype=torch.long),
            "score_target": torch.tensor(score_target, dtype=torch.long),
            "score_answer": torch.tensor(score_answer, dtype=torch.long),
            "last_index": torch.tensor(last_index), "weight": weight}

def iterate_batches(examples, batch_size, seed=None):
    """Yield lists of batch_size examples (the last one may be shorter); shuffled by `seed` when given."""
    order = np.arange(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start: start + batch_size]]

# ----------------------------------------------------------------------------- the built-in world
# A person asks for a snack, a drink or a dinner, says which taste they like, and sometimes asks for a short
# answer. The assistant recommends one item of a 3 x 4 menu (one item per category and taste), may say what it
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
        prompts.append("\n\nHuman: " + " ".join(words) + ASSISTANT)
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
