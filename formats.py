"""The files cwpo reads besides checkpoints, beside the method: preference data (Anthropic HH-RLHF
transcripts, OpenAI TL;DR comparisons, UltraFeedback-style pairs with answers as strings or chat-message
lists, plain and unlabeled pairs; .jsonl, .jsonl.gz or .parquet) and tokenizers (tokenizer.json or
vocab.json + merges.txt, the special tokens, the chat template and the jinja2 environment it renders in).
data.py tokenizes through these.

    pairs = load_pairs("hh-rlhf/harmless-base/test.jsonl.gz")   # [{"prompt", "chosen", "rejected"}]
    tok = load_tokenizer("models/smollm2-135m")                   # tok.eos_id, tok.chat_template
"""
import functools
import gzip
import json
import os
import pathlib
import re
import sys
from datetime import datetime

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runs import read_json

ASSISTANT = "\n\nAssistant:"

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

def _chat(value, key):
    """A chat-message list checked: dicts with string "role" and "content"; a ValueError naming the key otherwise."""
    ok = isinstance(value, list) and all(isinstance(m, dict) for m in value)
    if not ok or not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise ValueError(f"key {key!r}: a chat-message list needs string 'role' and 'content' in every message")
    return value

def _pairs(record):
    """{"prompt", "chosen", "rejected"}; UltraFeedback-binarized style answers may be chat-message lists. The data is
    conversational (TRL's word) when the prompt comes as chat messages: the messages before the final assistant
    message, TRL's "prompt" as a chat-message list, or a "messages" key as cwpo writes them (weak_labels.jsonl, the
    splits). They are kept under "messages" (data.py renders them with a chat template); the text prompt is the
    "prompt" key, or else their contents joined by blank lines (plain-text runs)."""
    (chosen, history), (rejected, other) = _answer_text(record, "chosen"), _answer_text(record, "rejected")
    if history and other and history != other:  # two prompts: no pair
        raise ValueError("keys 'chosen' and 'rejected' hold different chat histories before their answers")
    if isinstance(record.get("prompt"), list):
        history = _chat(record["prompt"], "prompt")
    elif not history and "messages" in record:
        history = _chat(record["messages"], "messages")
    if isinstance(record.get("prompt"), str) or not history:
        prompt = _field(record, "prompt")
    else:
        prompt = "\n\n".join(_field(m, "content", name="chosen[].content") for m in history)
    chat = {"messages": _chat(history, "chosen")} if history else {}
    return {"prompt": prompt, **chat, "chosen": chosen, "rejected": rejected,
            **_numeric_extras(record, ("prompt", "chosen", "rejected"))}

def _unlabeled(record):
    """{"prompt", "answer_a", "answer_b"}: a pair without a label."""
    keys = ("prompt", "answer_a", "answer_b")
    return {**{k: _field(record, k) for k in keys}, **_numeric_extras(record, keys)}

def _hh_chat(record):
    """HH-RLHF read as a chat (fmt "hh-chat", TRL's conversational form): the transcript's prompt as alternating
    user / assistant messages under "messages", the answers without their leading space."""
    pair = _hh(record)
    parts = re.split(r"\n\n(Human|Assistant):", pair["prompt"])[1:-2]  # [who, text, who, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[::2], parts[1::2])]
    return {**pair, "messages": turns, "chosen": pair["chosen"].strip(), "rejected": pair["rejected"].strip()}

PARSERS = {"hh": _hh, "hh-chat": _hh_chat, "tldr": _tldr, "ufb": _pairs, "pairs": _pairs, "unlabeled": _unlabeled}

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

def form(tok, pairs):
    """The line each run prints once: which form its prompts are read in (data.prompt_of decides)."""
    chat = any("messages" in p for p in pairs)
    if chat and getattr(tok, "chat_template", None):
        return f"prompts: chat messages rendered with the chat template of {tok.template_file}"
    return "prompts: plain text" + (", though the data is conversational (no chat template)" * chat)

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

# ----------------------------------------------------------------------------------- Tokenizers

def load_tokenizer(path, chat_template=True):
    """A tokenizers.Tokenizer from tokenizer.json, or from vocab.json + merges.txt (GPT-2 / OPT
    folders), with the special ids the checkpoint declares as tok.bos_id, tok.eos_id, tok.pad_id
    (pad falls back to eos), and its chat template (data.render) unless chat_template is False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    file = os.path.join(path, "tokenizer.json")
    merges = os.path.join(path, "merges.txt")
    if os.path.exists(file):
        try:
            tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{file}: not a readable tokenizer ({e})") from None
    elif os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(merges):
        file = os.path.join(path, "vocab.json")
        tok = Tokenizer(models.BPE.from_file(file, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
    tok.file = file  # named in messages

    meta = {}
    for name in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):  # later win
        if os.path.exists(os.path.join(path, name)):
            meta.update(read_json(os.path.join(path, name)))
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = meta.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        ids[kind] = tok.token_to_id(token) if token is not None else None
        if ids[kind] is None:
            value = meta.get(f"{kind}_token_id")
            ids[kind] = value[0] if isinstance(value, list) else value
    tok.bos_id = ids["bos"]
    tok.eos_id = ids["eos"]
    tok.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
    jinja = os.path.join(path, "chat_template.jinja")  # where transformers 5 saves the template
    config_file = os.path.join(path, "tokenizer_config.json")
    tok.template_file = jinja if os.path.exists(jinja) else config_file
    template = meta.get("chat_template")
    template = pathlib.Path(jinja).read_text() if os.path.exists(jinja) else template
    if isinstance(template, list):  # named templates: the "default" one
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    tok.chat_template = template if chat_template else None

    if meta.get("add_bos_token") and tok.bos_id is not None and tok.post_processor is None:
        bos = tok.id_to_token(tok.bos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_id)])
    return tok

@functools.lru_cache
def compile_template(source):
    """A chat template in transformers' environment (utils/chat_template_utils.py): the immutable
    sandbox, trim_blocks, lstrip_blocks, loopcontrols, tojson, raise_exception, strftime_now."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
