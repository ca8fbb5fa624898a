"""Align a policy: SFT, or preference optimization with any loss of cwpo.py and any per-pair weighting.

    python train_policy.py --model runs/sft --data runs/weak/weak_labels.jsonl --loss sigmoid --weighting confidence --out runs/cw-dpo
    python train_policy.py --model opt-125m --data hh.jsonl.gz --sft --out runs/sft
    torchrun --nproc-per-node 8 train_policy.py ...     # data parallel (torch.distributed), same global batch

Reference log-probs are computed once, before training, with the starting weights: no second model
is kept in memory. Checkpoints are written atomically to OUT/checkpoint and resumed with --resume.
"""
import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import cwpo
import data
from model import RewardModel, atomic_write, load_model, load_tokenizer, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def distributed():
    """(rank, world size, device): torchrun's environment when present, else one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def pair_weights(pairs, weighting, top_fraction):
    """-> (pairs, weights): CW-PO's confidence, all ones, or the top-N % most confident pairs with weight 1."""
    if weighting == "none":
        return pairs, [1.0] * len(pairs)
    if any("confidence" not in p for p in pairs):
        raise ValueError(f"--weighting {weighting} needs a 'confidence' in every pair (as train_weak.py writes)")
    confidence = torch.tensor([float(p["confidence"]) for p in pairs])
    if weighting == "confidence":
        return pairs, confidence.tolist()
    keep = cwpo.top_fraction_mask(confidence, top_fraction).bool().tolist()  # hard selection: the others are dropped
    return [p for p, k in zip(pairs, keep) if k], [1.0] * sum(keep)


@torch.no_grad()
def add_reference_logps(model, examples, pad_id, batch_size, device, ld_alpha=None, bf16=False):
    """Store the starting model's summed log-probs in each example ("ref_chosen_logps", "ref_rejected_logps"),
    computed as the policy's are in training (ld_alpha, bf16 autocast on CUDA), so that the first step's log-ratios are 0."""
    model.eval()
    for chunk in data.iterate_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logps = cwpo.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                        ld_alpha=ld_alpha)["logps"]
        chosen, rejected = logps.float().cpu().chunk(2)
        for ex, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r


def lr_at(step, total, args):
    """Linear warmup, then linear decay to 10 % of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (1.0 - 0.9 * (step - args.warmup_steps) / max(1, total - args.warmup_steps))


def micro_loss(model, micro, pad_id, device, args, scale):
    """Loss of one micro-batch, scaled so that the gradients summed over micro-batches and over ranks are
    those of the global batch's loss; returns (loss, metrics, completion tokens)."""
    batch = {k: v.to(device) for k, v in data.collate(micro, pad_id).items()}
    n_tokens = int(batch["completion_mask"].sum())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
        if args.objective == "sft":  # token-level mean NLL of the answers
            logps = cwpo.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])["logps"]
            return -logps.sum() * scale, {}, n_tokens
        if args.objective == "bt":  # the weak annotator: Bradley-Terry on its scalar scores (PAPER.md step 1)
            chosen_scores, rejected_scores = model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            losses = cwpo.bt_loss(chosen_scores, rejected_scores)
            metrics = {"accuracy": (chosen_scores > rejected_scores).float().mean().item(),
                       "margin": (chosen_scores - rejected_scores).mean().item()}
            return (losses * batch["weight"]).sum() * scale, metrics, n_tokens
        ref_chosen = torch.tensor([ex["ref_chosen_logps"] for ex in micro], device=device)
        ref_rejected = torch.tensor([ex["ref_rejected_logps"] for ex in micro], device=device)
        # "mean" within the micro-batch; train() turns it into --normalize over the global batch via `scale`
        loss, metrics = cwpo.batch_loss(model, batch, ref_chosen, ref_rejected, loss_type=args.loss, beta=args.beta,
                                        normalize="mean", **json.loads(args.loss_options))
    return loss * len(micro) * scale, metrics, n_tokens


def train(model, examples, pad_id, args, rank=0, world=1, device=torch.device("cpu"), log=print):
    """Train `model` in place on encoded examples: pairs (objective "preference" or "bt"), or sequences ("sft")."""
    if not examples:
        raise ValueError("no training examples")
    os.makedirs(args.out, exist_ok=True)
    model.grad_checkpointing = args.grad_checkpointing
    # fused: one kernel over all parameters, no per-tensor temporaries (about 5x faster than foreach on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs
    state_file, step = os.path.join(args.out, "checkpoint", "train_state.pt"), 0
    if args.resume and os.path.exists(state_file):
        state = torch.load(state_file, weights_only=False)
        saved = load_model(os.path.join(args.out, "checkpoint"), dtype=torch.float32, reward=isinstance(model, RewardModel))
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log(f"resumed from {state_file} at step {step}")
    if world > 1:  # every rank starts from rank 0's weights (a fresh scalar head is random)
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    t0, seen_tokens, first = time.time(), 0, step
    model.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = [examples[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
        local = batch[rank::world]
        # normalize over the global batch: pairs for "mean", sum of weights for "sum_w", tokens for SFT
        denom = (sum(len(ex["answer_ids"]) for ex in batch) if args.objective == "sft" else
                 sum(ex.get("weight", 1.0) for ex in batch) if args.normalize == "sum_w" else len(batch))
        micros = [local[i::args.grad_accum] for i in range(args.grad_accum) if local[i::args.grad_accum]]
        totals, n_tokens = {}, 0
        for i, micro in enumerate(micros):
            loss, metrics, tokens = micro_loss(model, micro, pad_id, device, args, 1.0 / denom)
            loss.backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * len(micro) / len(batch)
            n_tokens += tokens
        if world > 1:  # data parallel: each rank's loss is its share of the global batch's, so the sum is exact
            for work in [dist.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.grad is not None]:
                work.wait()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:  # one vector all-reduce for the logged numbers
            packed = torch.tensor(list(totals.values()) + [n_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(packed)
            totals, n_tokens = dict(zip(totals, packed[:-1].tolist())), int(packed[-1])
        seen_tokens += n_tokens
        if rank == 0 and (step % args.log_every == 0 or step == total):
            elapsed = time.time() - t0
            eta = elapsed / (step - first) * (total - step)
            record = dict(step=step, epoch=round(step / steps_per_epoch, 3), lr=lr_at(step - 1, total, args), grad_norm=grad_norm,
                          tokens_per_s=seen_tokens / elapsed, elapsed_s=elapsed, **totals)
            shown = " ".join(f"{k} {v:.4f}" for k, v in totals.items())
            log(f"step {step}/{total} | {shown} | {seen_tokens / elapsed:,.0f} tok/s | ETA {eta / 60:.1f} min")
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if rank == 0 and args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(model, optimizer, step, args)
    return model


def save_checkpoint(model, optimizer, step, args):
    path = os.path.join(args.out, "checkpoint")
    save_model(model, path)
    atomic_write(os.path.join(path, "train_state.pt"), lambda tmp: torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp))


def encode_examples(tok, pairs, args):
    """Pairs -> encoded examples: chosen answers only for SFT, else preference pairs with their weights."""
    if args.objective == "sft":
        return [data.encode_prompt_answer(tok, p["prompt"], p["chosen"], args.max_prompt_len, args.max_answer_len) for p in pairs]
    pairs, weights = pair_weights(pairs, args.weighting, args.top_fraction)
    examples = [data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len, args.max_answer_len) for p in pairs]
    for ex, w in zip(examples, weights):
        ex["weight"] = w
    return examples


def main(args):
    rank, world, device = distributed()
    torch.manual_seed(args.seed)
    if args.loss not in cwpo.LOSS_TYPES and args.objective == "preference":
        raise SystemExit(f"unknown --loss {args.loss!r}; known: {', '.join(cwpo.LOSS_TYPES)}")
    options = json.loads(args.loss_options) if args.loss_options.strip().startswith("{") else None
    known = set(inspect.signature(cwpo.preference_loss).parameters) | set(inspect.signature(cwpo.batch_loss).parameters)
    if options is None or set(options) - known:
        raise SystemExit(f"--loss-options must be a JSON object of options of cwpo.batch_loss / preference_loss, got {args.loss_options!r}")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32, device=device)
    examples = encode_examples(tok, data.load_pairs(args.data, args.format, skip_bad=args.skip_bad), args)
    if rank == 0:
        print(f"{len(examples)} examples from {args.data}; model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}")
    if args.objective == "preference":
        micro_size = max(1, args.batch_size // (world * args.grad_accum))  # what fits in memory for training fits here
        add_reference_logps(model, examples, tok.pad_id, micro_size, device, options.get("ld_alpha"), args.bf16)
    train(model, examples, tok.pad_id, args, rank, world, device)
    if rank == 0:
        save_model(model, args.out)
        for name in TOKENIZER_FILES:  # the policy folder is a complete checkpoint
            if os.path.exists(os.path.join(args.model, name)):
                shutil.copy(os.path.join(args.model, name), os.path.join(args.out, name))
        print(f"saved {args.out}")
    if world > 1:  # every rank waits for rank 0's save; then leave without gloo's teardown, which can abort at exit
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def add_training_args(p):
    """Flags shared with train_weak.py: data, model, optimization, logging."""
    p.add_argument("--model", required=True, help="starting checkpoint folder (for a policy: the SFT model, also the reference)")
    p.add_argument("--data", required=True, help="pairs file (.jsonl / .jsonl.gz): HH-RLHF, TL;DR, UltraFeedback, weak labels, ...")
    p.add_argument("--format", default="auto", help="data format for data.load_pairs (hh, tldr, ufb, pairs)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs (or sequences) per optimizer step, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=10.0)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-answer-len", type=int, default=256)
    p.add_argument("--normalize", default="mean", choices=("mean", "sum_w"), help="divide sum(w * loss) by the pair count or by sum(w)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    return p


def parser():
    p = add_training_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--sft", dest="objective", action="store_const", const="sft", default="preference",
                   help="supervised fine-tuning on the chosen answers instead of preference optimization")
    p.add_argument("--loss", default="sigmoid", help="a loss of cwpo.LOSS_TYPES (sigmoid = DPO, ipo, robust = rDPO, ...)")
    p.add_argument("--loss-options", default="{}", help='extra keyword options of the loss as JSON, e.g. \'{"label_smoothing": 0.1}\'')
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--weighting", default="none", choices=("none", "confidence", "top"), help="per-pair weights: CW-PO is 'confidence'")
    p.add_argument("--top-fraction", type=float, default=0.3, help="with --weighting top: the fraction of most confident pairs kept")
    return p


if __name__ == "__main__":
    try:
        main(parser().parse_args())
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e.args[0] if e.args else e}")
