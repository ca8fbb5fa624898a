"""Data for CW-PO: loaders, the labeled / unlabeled / held-out split, the one tokenization path and batch
layout (see collate). The built-in synthetic world is world.py."""
import gzip
import json
import os
import sys

import numpy as np
import torch

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
    (chosen, history), (rejected, other) = _answer_text(record, "chosen"), _answer_text(record, "rejected")
    if history and other and history != other:  # two prompts: no pair
        raise ValueError("keys 'chosen' and 'rejected' hold different chat histories before their answers")
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

def load_pairs(path, fmt="auto", skip_bad=False, labeled=False):
    """Read preference pairs from a .jsonl, .jsonl.gz or .parquet file: a list of {"prompt", "chosen", "rejected"}
    dicts ({"prompt", "answer_a", "answer_b"} for fmt="unlabeled"). fmt "auto" takes the format of the first record.
    A malformed record raises ValueError naming the file, the 1-based line (or row) and the key; with skip_bad=True
    it is skipped instead and one line on stderr says how many were. Blank lines are not records. With labeled=True
    (training) unlabeled pairs, which have no "chosen", are refused."""
    if fmt != "auto" and fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {tuple(PARSERS)}")
    parquet = str(path).endswith(".parquet")
    opener = gzip.open if str(path).endswith(".gz") else open
    pairs, n_bad, first_bad, unit = [], 0, None, "row" if parquet else "line"
    with opener(path, "rb") as f:
        for lineno, line in _parquet_rows(f, path) if parquet else _lines(f, path):
            if not parquet and not line.strip():
                continue
            try:  # bad JSON and bad UTF-8 are ValueErrors too
                record = line if parquet else json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("a record must be a JSON object")
                if fmt == "auto":
                    fmt = detect_format(record)
                if fmt == "unlabeled" and labeled:
                    raise ValueError("an unlabeled pair (answer_a / answer_b): a labeled pair (chosen / "
                                     "rejected) is needed here")
                pairs.append(PARSERS[fmt](record))
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path}, {unit} {lineno}: {e}") from None
                n_bad += 1
                first_bad = first_bad or f"{unit} {lineno}: {e}"
    if n_bad:
        print(f"load_pairs: skipped {n_bad} malformed record(s) in {path} (first: {first_bad})", file=sys.stderr)
    if not pairs:
        raise ValueError(f"{path}: no records" + (f" ({n_bad} malformed skipped)" if n_bad else ""))
    n_same = sum(p.get("chosen", 0) == p.get("rejected", 1) for p in pairs)
    if n_same:  # no gradient: DPO trains them at a constant log 2
        print(f"load_pairs: {n_same} pair(s) in {path} have identical chosen and rejected answers", file=sys.stderr)
    return pairs

def _parquet_rows(f, path):
    """(1-based row number, row dict) of an open parquet file (as UltraFeedback-binarized is), by optional pyarrow."""
    try:
        import pyarrow.parquet
        return enumerate(pyarrow.parquet.read_table(f).to_pylist(), 1)
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs the package pyarrow (pip install pyarrow)") from None
    except pyarrow.ArrowException as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None

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

def collate(examples):
    """Batch encoded examples in the one layout every script uses: one row, no padding, each prompt computed once
    and followed by its answer(s). The row of pair 0 (prompt p0, chosen c0, rejected r0) and pair 1:

        input_ids     p0 p0 p0 c0 c0 r0 r0 r0 | p1 p1 c1 c1 c1 r1
        position_ids   0  1  2  3  4  3  4  5 |  0  1  2  3  4  2    each answer continues its prompt
        segment_ids    0  0  0  0  0  0  0  0 |  1  1  1  1  1  1    the example
        branch_ids     0  0  0  1  1  2  2  2 |  0  0  1  1  1  2    0 prompt, 1 chosen, 2 rejected

    A token attends to the earlier tokens of its own example that lie in the prompt or in its own branch
    (model.visible): the rejected answer never sees the chosen one, and each answer's log-probs are those of
    prompt + answer alone. The first token of each answer is predicted from the prompt's last position, so the
    tokens to score are listed explicitly, grouped by answer in order (answer a = pair i's chosen i, its
    rejected B + i; for single sequences, encode_prompt_answer, answer i):
      score_index  [N] long  index in the row of the hidden state that predicts the token
      score_target [N] long  the token id;   score_answer [N] long  its answer
      last_index   [A] long  index of each answer's last token (the reward model's score is read there)
    With input_ids, position_ids, segment_ids, branch_ids [1, T] long and weight [B] float: each example's
    "weight", else 1. An answer's first token has no predictor, and is not scored, after an empty prompt.
    """
    keys = ("chosen_ids", "rejected_ids") if "chosen_ids" in examples[0] else ("answer_ids",)
    layout = {name: [] for name in ("input_ids", "position_ids", "segment_ids", "branch_ids")}

    def put(ids, first_position, segment, branch):
        for name, values in (("input_ids", ids), ("position_ids", range(first_position, first_position + len(ids))),
                             ("segment_ids", [segment] * len(ids)), ("branch_ids", [branch] * len(ids))):
            layout[name] += values

    scored = [[] for _ in range(len(keys) * len(examples))]  # per answer: (score_index, score_target)
    last_index = [0] * len(scored)
    for i, example in enumerate(examples):
        prompt, column = example["prompt_ids"], len(layout["input_ids"])
        put(prompt, 0, i, 0)
        for b, key in enumerate(keys):
            answer, a, at = example[key], b * len(examples) + i, len(layout["input_ids"])  # `at`: where it starts
            put(answer, len(prompt), i, b + 1)
            flat = lambda t: column + t if t < len(prompt) else at + t - len(prompt)  # noqa: E731
            # position t of prompt + answer predicts token t + 1
            scored[a] = [(flat(len(prompt) + j - 1), token) for j, token in enumerate(answer) if len(prompt) + j]
            last_index[a] = flat(len(prompt) + len(answer) - 1)
    flat_scored = [(index, target, a) for a, tokens in enumerate(scored) for index, target in tokens]
    score_index, score_target, score_answer = zip(*flat_scored) if flat_scored else ((), (), ())
    return {**{name: torch.tensor([value]) for name, value in layout.items()},
            "score_index": torch.tensor(score_index, dtype=torch.long),
            "score_target": torch.tensor(score_target, dtype=torch.long),
            "score_answer": torch.tensor(score_answer, dtype=torch.long),
            "last_index": torch.tensor(last_index),
            "weight": torch.tensor([ex.get("weight", 1.0) for ex in examples], dtype=torch.float32)}

def iterate_batches(examples, batch_size, seed=None):
    """Yield lists of batch_size examples (the last one may be shorter); shuffled by `seed` when given."""
    order = np.arange(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start: start + batch_size]]
