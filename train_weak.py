"""The weak annotator (CW-PO's weak LLM): a small LM with a scalar head, trained with the
Bradley-Terry loss on the labeled part, then used to label the unlabeled pairs with its confidence.

    python train_weak.py --model opt-125m --data hh-rlhf/harmless-base/train.jsonl.gz --out runs/weak

writes OUT/ (the annotator), OUT/splits/{labeled,human_pool,heldout}.jsonl, OUT/weak_labels.jsonl
(the unlabeled pairs, or those of --unlabeled, as the annotator ranks them, with scores and
confidence) and OUT/report.json (accuracy and calibration on held-out human labels, or on the
unlabeled pairs' when --eval-size is 0).
"""
import argparse
import json
import math
import os
import pathlib
import time

import numpy as np
import torch

import cwpo
import data
import formats
import runs
import train_policy
from lora import merge_lora
from model import save_model
from formats import load_tokenizer
from runs import atomic_write, write_jsonl

OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "config.json", "splits",
           "weak_labels.jsonl", "report.json", "log.jsonl") + runs.TOKENIZER_FILES

def bt_objective(model, batch):
    """The annotator's loss for train_policy.train: sum_i w_i * BT loss of the pair's scalar scores
    (cwpo.bt_loss), each score read at the last token of prompt + answer."""
    scores = model(batch["input_ids"], layout=batch).float()  # [2B]
    chosen_scores, rejected_scores = scores.chunk(2)
    losses = cwpo.bt_loss(chosen_scores, rejected_scores)  # [B]
    metrics = {"accuracy": (chosen_scores > rejected_scores).float().mean().item(),
               "margin": (chosen_scores - rejected_scores).mean().item()}
    return (losses * batch["weight"]).sum(), metrics

@torch.no_grad()
def score_pairs(rm, tok, pairs, args, device, log=print):
    """Annotator scores of both answers of each pair -> (scores of "chosen", of "rejected"), [P]."""
    rm.eval()
    device = torch.device(device)
    autocast = runs.bf16_enabled(getattr(args, "bf16", None), device)  # world.py's args have none
    first, second, t0 = [], [], time.time()
    for chunk in data.iterate_batches(train_policy.encode_pairs(tok, pairs, args), args.batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            a, b = rm(batch["input_ids"], layout=batch).float().cpu().chunk(2)
        first.append(a)
        second.append(b)

        done = sum(len(part) for part in first)
        if len(first) % args.log_every == 0 or done == len(pairs):
            eta = (time.time() - t0) / done * (len(pairs) - done)
            log(f"scored {done}/{len(pairs)} pairs | ETA {eta / 60:.1f} min")
    return torch.cat(first), torch.cat(second)

def weak_labels(pairs, score_a, score_b):
    """Relabel pairs by the annotator: the higher-scoring answer becomes "chosen", with its
    confidence C. `human_agrees` records whether the annotator kept the pair's original order
    (for reports only)."""
    a_wins, confidences = cwpo.confidence(score_a, score_b)
    labeled = []
    rows = zip(pairs, a_wins.tolist(), confidences.tolist(), score_a.tolist(), score_b.tolist())
    for pair, win, c, sa, sb in rows:
        chosen, rejected = (pair["chosen"], pair["rejected"]) if win else (pair["rejected"], pair["chosen"])
        prompt = {k: pair[k] for k in ("prompt", "messages") if k in pair}  # a chat keeps its messages
        labeled.append({**prompt, "chosen": chosen, "rejected": rejected,
                        "score_chosen": max(sa, sb), "score_rejected": min(sa, sb),
                        "confidence": c, "human_agrees": int(win)})
    return labeled

def annotator_report(confidences, correct, n_bins=10):
    """How good the weak labels are: accuracy with a 95 % interval (Wilson's, inside [0, 1]),
    accuracy within the top 10 / 30 / 50 % and the bottom 50 % most confident, and the calibration
    of p = (1 + C) / 2 (the BT probability of the weak label) over n_bins equal-width bins of
    [0.5, 1]: per bin its mean p, accuracy and pair count (a reliability diagram), and the expected
    calibration error ECE = sum_b (n_b / n) |mean p_b - accuracy_b|."""
    confidences = np.asarray(confidences, dtype=float)
    correct = np.asarray(correct, dtype=float)
    order = np.argsort(-confidences, kind="stable")
    n = len(correct)

    accuracy, z = float(correct.mean()), 1.96
    center = (accuracy + z * z / (2 * n)) / (1 + z * z / n)  # Wilson's score interval
    half_width = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    report = {"pairs": n, "accuracy": accuracy, "accuracy_lo": max(0.0, center - half_width),
              "accuracy_hi": min(1.0, center + half_width)}
    for top in (10, 30, 50):
        report[f"accuracy_top{top}"] = float(correct[order[:max(1, round(n * top / 100))]].mean())
    bottom = correct[order[round(n * 0.5):]]
    report["accuracy_bottom50"] = float(bottom.mean()) if n > 1 else accuracy

    p = (1.0 + confidences) / 2.0
    bins = np.minimum(((p - 0.5) * 2 * n_bins).astype(int), n_bins - 1)
    report["bins"] = [{"p_lo": 0.5 + b / (2 * n_bins), "p_hi": 0.5 + (b + 1) / (2 * n_bins),
                       "pairs": int((bins == b).sum()), "mean_p": float(p[bins == b].mean()),
                       "accuracy": float(correct[bins == b].mean())}
                      for b in range(n_bins) if (bins == b).any()]
    gaps = (abs(b["mean_p"] - b["accuracy"]) * b["pairs"] / len(p) for b in report["bins"])
    report["ece"] = float(sum(gaps))
    return report

def train_annotator(labeled, args, device, log=print):
    """A reward model from args.model, trained with BT on the labeled pairs; -> (model, tokenizer)."""
    tok = load_tokenizer(args.model, args.chat_template)
    log(formats.form(tok, labeled))
    rm = train_policy.load_trainable(args, tok, device, reward=True)
    log(runs.memory_line(rm.config, args, 1, device, reward=True))
    examples = train_policy.encode_pairs(tok, labeled, args)
    train_policy.train(rm, examples, args, bt_objective, device=device, log=log)
    return rm, tok

def main(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run the whole job into one --out
        raise ValueError("train_weak.py runs in one process: start it with python, not torchrun")
    _, _, device = runs.distributed()
    torch.manual_seed(args.seed)
    pairs = formats.load_pairs(args.data, args.format, args.skip_bad, labeled=True)
    labeled, unlabeled, heldout = data.split_pairs(pairs, args.labeled_fraction, args.eval_size,
                                                   args.seed)
    print(f"{len(pairs)} pairs: {len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(heldout)} held out")
    if not labeled or not unlabeled:
        raise ValueError("the split left no labeled or no unlabeled pairs: change "
                         "--labeled-fraction or --eval-size")
    tie = torch.tensor([p["chosen"] == p["rejected"] for p in heldout or unlabeled])  # no winner
    if tie.all():
        raise ValueError(f"{args.data}: every pair the report is on has two identical answers: change --eval-size")
    to_label = unlabeled  # or pairs that never had a label: answer_a / answer_b as chosen / rejected
    if args.unlabeled:
        never_labeled = formats.load_pairs(args.unlabeled, "unlabeled", args.skip_bad)
        to_label = [{"prompt": p["prompt"], "chosen": p["answer_a"], "rejected": p["answer_b"]}
                    for p in never_labeled]

    runs.claim(args.out, OUTPUTS, args)
    rm, tok = train_annotator(labeled, args, device)

    # without held-out pairs the report is on the unlabeled pairs' hidden human labels
    scores = score_pairs(rm, tok, heldout or unlabeled, args, device)
    a_wins, confidences = cwpo.confidence(*scores)  # "chosen" is the human label: a wins = correct
    report = annotator_report(confidences[~tie].tolist(), a_wins[~tie].tolist())
    report.update(on="heldout" if heldout else "unlabeled (no held-out pairs)",
                  ties_left_out=int(tie.sum()))
    print("annotator vs human labels:", json.dumps({k: v for k, v in report.items() if k != "bins"}))
    if heldout or args.unlabeled:
        scores = score_pairs(rm, tok, to_label, args, device)
    labels = weak_labels(to_label, *scores)

    # every output is written only now, each atomically, the model last: a run stopped before
    # leaves none of them
    os.makedirs(os.path.join(args.out, "splits"), exist_ok=True)
    splits = {"labeled": labeled, "human_pool": labeled + unlabeled, "heldout": heldout}
    for name, records in splits.items():
        write_jsonl(os.path.join(args.out, "splits", f"{name}.jsonl"), records)
    write_jsonl(os.path.join(args.out, "weak_labels.jsonl"), labels)
    atomic_write(os.path.join(args.out, "report.json"),
                 lambda tmp: pathlib.Path(tmp).write_text(json.dumps(report, indent=2)))
    runs.copy_tokenizer(args.model, args.out)  # the annotator (a judge) reads its own tokens
    save_model(merge_lora(rm), args.out)
    mean_confidence = np.mean([label["confidence"] for label in labels])
    print(f"wrote {args.out}/weak_labels.jsonl ({len(labels)} pairs, mean confidence {mean_confidence:.3f})")

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_training_args(p)
    p.set_defaults(objective="bt", lr=1e-5)
    p.add_argument("--labeled-fraction", type=float, default=0.3,
                   help="share of the (non-held-out) pairs whose human label is used")
    p.add_argument("--eval-size", type=runs.fraction_or_count, default=0.1,
                   help="held-out pairs: a fraction (< 1) or a count")
    p.add_argument("--unlabeled",
                   help="label this file of (prompt, answer_a, answer_b) pairs instead of the rest")
    return p

if __name__ == "__main__":
    runs.run_script(main, parser().parse_args(), standalone=True)
