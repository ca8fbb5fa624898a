"""The gold judges of eval.py's GRA and its files, around the method. A judge of the loader's families
(Skywork-Reward-V2-Llama-3.1-8B, the HH-RLHF / UltraFeedback judge of the paper's configs) is read with its own
tokenizer and chat template; a judge of another architecture (OpenAssistant/reward-model-deberta-v3-large-v2, the
TL;DR judge) through transformers' AutoModelForSequenceClassification, an optional package as pyarrow is for
parquet. A GRA run writes its answers and scores, and a rerun reads the answers back to score them again.

    OUT/answers.jsonl  one line a prompt: "prompt" (and "messages" when conversational), "policy" and "sft" (its
                       answers, one a sample), "policy_scores" / "sft_scores" (the judge's), "policy_score" /
                       "sft_score" (their means) and "outcome" (1 the policy's wins, 0.5 a tie, 0 the SFT's)
    OUT/summary.json   "gra" (the mean outcome, in %), "lo" / "hi" (its bootstrap 95 % interval), "prompts",
                       "mean_policy_score", "mean_sft_score" and "settings" (the flags of SETTINGS)
"""
import json
import os
import pathlib

import numpy as np
import torch

import data
from model import HF_NAMES, load_model
from formats import load_tokenizer
from runs import atomic_write, check_fits, read_json

SETTINGS = ("policy", "sft", "prompts", "format", "judge", "answers", "eval_prompts", "max_prompt_len",
            "max_new_tokens", "temperature", "top_p", "samples", "seed", "chat_template")

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

def load_judge(args, device):
    """-> scores(records, answers) of --judge, with .tok (its tokenizer) and .check(records, answer_len) (that it
    can read them, before generation): a judge of the loader's families is read with its own tokenizer and chat
    template, data.py's path; another architecture through transformers."""
    family = read_json(os.path.join(args.judge, "config.json")).get("model_type")
    if family not in HF_NAMES:
        return transformers_judge(args.judge, family, device, args.chat_template)
    judge = load_model(args.judge, dtype=torch.float32, device=device, reward=True,
                       trained_head=True).eval()
    judge_tok = load_tokenizer(args.judge, args.chat_template)  # without its own: the run stops

    def scores(records, answers):
        prompts = [data.prompt_of(judge_tok, r) for r in records]
        return judge_scores(args.judge, judge, judge_tok, prompts, answers, device)

    def check(records, answer_len):  # before generation: the prompts' lengths + answer_len
        ids = [data.encode_prompt(judge_tok, data.prompt_of(judge_tok, r), 10**9) for r in records]
        check_fits(args.judge, judge.config, judge_tok, max(map(len, ids)) + answer_len,
                   "the prompts + --max-new-tokens + EOS")
    scores.check, scores.tok = check, judge_tok
    return scores

def transformers_judge(path, family, device, chat_template=True):
    """-> scores(records, answers): transformers' scalar reward of each prompt + answer (logits[0, 0]), read as the
    OpenAssistant reward models are: the tokenizer's text pair (prompt, answer); a conversational prompt with a
    chat template instead as the chat it renders (apply_chat_template), as Skywork's reward models are read."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{path}: a judge of model_type {family!r} is scored through the package transformers, "
                         "which is not installed (pip install transformers)") from None
    transformers.logging.set_verbosity_error()  # its warnings about a foreign checkpoint: ours is one line
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    except (ValueError, KeyError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{os.path.join(path, 'config.json')}: model_type {family!r} is read neither by cwpo's "
                         f"loader ({', '.join(HF_NAMES)}) nor by transformers ({reason})") from None
    tok.chat_template = tok.chat_template if chat_template else None
    tok.template_file = path  # for formats.form's line

    @torch.no_grad()
    def scores(records, answers):
        out = []
        for record, answer in zip(records, answers):
            prompt = data.prompt_of(tok, record)
            if isinstance(prompt, list):
                chat = prompt + [{"role": "assistant", "content": answer}]
                inputs = tok.apply_chat_template(chat, return_dict=True, return_tensors="pt")
            else:
                inputs = tok(prompt, answer, truncation=True, return_tensors="pt")
            out.append(model(**inputs.to(device)).logits[0, 0].item())
        return out
    scores.tok, scores.check = tok, lambda records, answer_len: None  # transformers truncates
    return scores

def score_records(score, records):
    """Each record's answers scored by the judge, "policy_scores" / "sft_scores"; a prompt's score is the mean over
    its samples ("policy_score", "sft_score", as world.py's GRA) and its outcome 1, 0.5 (a tie) or 0."""
    for name in ("policy", "sft"):
        flat = iter(score([r for r in records for _ in r[name]], [a for r in records for a in r[name]]))
        for r in records:
            r[f"{name}_scores"] = [next(flat) for _ in r[name]]
            r[f"{name}_score"] = float(np.mean(r[f"{name}_scores"]))
    for r in records:
        r["outcome"] = (r["policy_score"] > r["sft_score"]) + 0.5 * (r["policy_score"] == r["sft_score"])

def write_results(out, records, summary):
    """OUT/answers.jsonl, then OUT/summary.json, each written whole (runs.atomic_write)."""
    os.makedirs(out, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(os.path.join(out, "answers.jsonl"), lambda tmp: pathlib.Path(tmp).write_text(text))
    summary_text = json.dumps(summary, indent=2)
    atomic_write(os.path.join(out, "summary.json"), lambda tmp: pathlib.Path(tmp).write_text(summary_text))

def read_answers(path):
    """The records of an answers.jsonl (write_results), to score again; a ValueError names the file, line and key."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not JSON ({e})") from None
            record = record if isinstance(record, dict) else {}
            for key, ok in (("prompt", isinstance(record.get("prompt"), str)),
                            *((key, isinstance(record.get(key), list) and record[key]
                               and all(isinstance(a, str) for a in record[key])) for key in ("policy", "sft"))):
                if not ok:
                    raise ValueError(f"{path}, line {lineno}: key {key!r} must be a string "
                                     f"{'' if key == 'prompt' else 'list (the answers)'}")
            records.append({k: v for k, v in record.items() if k in ("prompt", "messages", "policy", "sft")})
    if not records:
        raise ValueError(f"{path}: no answers")
    return records

def check_flags(parser, args):
    """eval.py's flags, before any work (argparse's error, one line): the defaults of GRA and of the
    built-in experiment, --temperature / --top-p in range, --policy with its three partners,
    --answers with --judge alone."""
    gra = bool(args.policy or args.answers)  # --out, --samples: GRA's files and answers per prompt
    defaults = dict(eval_prompts=500, samples=1) if gra else dict(eval_prompts=300, samples=4,
                                                                  out="runs/experiment")
    for name, value in defaults.items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature}, "
                     f"{args.top_p}")
    given = [f"--{name}" for name in ("policy", "sft", "judge", "prompts") if getattr(args, name)]
    if args.answers and given != ["--judge"]:
        parser.error(f"--answers goes with --judge alone; given {', '.join(given) or 'no --judge'}")
    if given and len(given) < 4 and not args.answers:
        parser.error(f"--policy, --sft, --judge and --prompts go together; given only {', '.join(given)}")

