"""Align a policy: SFT, or preference optimization with any loss of cwpo.py and any per-pair weighting.

    python train_policy.py --model runs/sft --data runs/weak/weak_labels.jsonl --weighting confidence --out runs/cw-dpo
    python train_policy.py --model opt-125m --data hh.jsonl.gz --sft --out runs/sft
    torchrun --nproc-per-node 8 train_policy.py ...     # FSDP2 over 8 ranks, same global batch, same result

Reference log-probs are computed once, before training, with the starting weights: no second model is kept in
memory. A run owns OUT: --save-every N writes OUT/checkpoint-STEP atomically; --resume continues from the newest
(made with the same settings), --overwrite replaces an earlier run's outputs.
"""
import argparse
import json
import math
import os
import pathlib
import pickle
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

import cwpo
import data
from model import LORA_MODULES, apply_lora, atomic_write, check_fits, load_model, load_tokenizer, merge_lora, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "config.json", "log.jsonl") + TOKENIZER_FILES
UNCOMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "max_steps", "epochs")  # resume may change

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

def shard(model, world_size, device):
    """FSDP2 over the ranks: each block is one group, the root (embeddings, final norm, heads) another; parameters,
    gradients and AdamW state live 1/world_size on each rank. Gradients are summed over the ranks, not averaged:
    each rank's loss is already its share of the global batch's. One process keeps the model as it is."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world_size,))
    body = getattr(model, "body", model)  # a RewardModel's decoder is .body
    for group in [*body.h, model]:
        fully_shard(group, mesh=mesh)
        group.set_gradient_divide_factor(1.0)
        group.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    if isinstance(body.project_in, torch.nn.Identity):  # past ln_f, backward reads no root weight: free them
        body.ln_f.register_full_backward_hook(lambda *_: model.reshard())
    return model

def memory_estimate(cfg, args, world_size=1, device=torch.device("cpu"), reward=False):
    """Peak bytes per rank of training model.GPT (or RewardModel) with these settings, from its Config.
    Parameters: fp32 weights 4, gradients 4 and AdamW 8 bytes each (a frozen LoRA base 2 on CUDA, else 4); a tied
    embedding gets a second [V, e] gradient (backward adds the head's to the lookup's). FSDP over the groups root and
    blocks: 1/world_size of each, plus the largest group's whole gradient and reduce-scatter input (8 bytes a
    parameter; LoRA: the root's and a block's weights); --grad-accum > 1 keeps gradients whole.
    Activations of the t = pairs (P + 2A) tokens of a micro-batch (P + A for SFT), s bytes each (2 under bf16): per
    token a block saves its norms' inputs, statistics and outputs 4d + 4 - 2r (r = 1: RMSNorm, RoPE, SwiGLU), for
    attention q, k, v, the output, its copy for o and the logsumexp 3q + 2kv + H, and the MLP's (2 + r - [relu]) f;
    checkpointed, a block keeps only its input d, and one block is recomputed at a time. The fused LM head holds
    min(N, 256) V fp32 logits."""
    d, q, kv, f, r = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.rope
    e, norm = cfg.proj_dim or d, d * (2 - r)  # LayerNorm: + bias
    linears = {"qkv": (d, q + 2 * kv, cfg.qkv_bias), "o": (q, d, cfg.o_bias), "gate": (d, f * r, cfg.mlp_bias),
               "up": (d, f, cfg.mlp_bias), "down": (f, d, cfg.mlp_bias)}  # gate: SwiGLU families only
    block = sum(i * o + o * bias for i, o, bias in linears.values()) + 2 * norm
    root = cfg.vocab_size * e + norm * cfg.final_norm + 2 * e * d * bool(cfg.proj_dim)
    root += (0 if r else (cfg.max_pos + 2 * (cfg.model_type == "opt")) * d) + (e if reward else 0)
    root += cfg.vocab_size * e * (not cfg.tie_word_embeddings and not reward)  # an untied LM head
    total, base = root + cfg.n_layer * block, 2 if args.lora_rank and device.type == "cuda" else 4
    trained = cfg.n_layer * sum(args.lora_rank * (i + o) for m, (i, o, _) in linears.items()
                                if m in args.lora_modules.split(",") and o) if args.lora_rank else total
    pairs = math.ceil(math.ceil(args.batch_size / world_size) / args.grad_accum)  # train's micro-batch
    length = args.max_prompt_len + (1 if args.objective == "sft" else 2) * args.max_answer_len
    saved = 4 * d + 4 - 2 * r + 3 * q + 2 * kv + cfg.n_head + (2 + r - (cfg.act == "relu")) * f  # a block, a token
    size = 2 if device.type == "cuda" and (args.bf16 or args.lora_rank) else 4  # bf16 autocast, else fp32
    kept = size * (d * cfg.n_layer + saved if args.grad_checkpointing else saved * cfg.n_layer)  # per token
    head = 0 if reward else min(pairs * (length - args.max_prompt_len), cwpo.DEFAULT_CHUNK_SIZE) * cfg.vocab_size * 4
    tied = 4 * cfg.vocab_size * e * (cfg.tie_word_embeddings and not args.lora_rank and not reward)
    est = {"weights": (total * base + trained * 4 if args.lora_rank else total * 4) / world_size,
           "gradients": 4 * trained / (1 if args.grad_accum > 1 else world_size), "optimizer": 8 * trained / world_size,
           "gathered": ((root + block) * base if args.lora_rank else 8 * max(root, block)) if world_size > 1 else tied,
           "activations": pairs * length * kept + head}
    return dict(est, total=sum(est.values()), parameters=total, trainable=trained)

def memory_line(cfg, args, world_size, device, reward=False):
    """The estimate for these settings, as the line each script prints at start."""
    est = memory_estimate(cfg, args, world_size, device, reward)
    return (f"memory per rank ({est['parameters'] / 1e6:.2f}M parameters, {est['trainable'] / 1e6:.2f}M trained, "
            f"{world_size} rank(s)): " + " + ".join(f"{k} {est[k] / 2**30:.2f}" for k in list(est)[:5]) +
            f" = {est['total'] / 2**30:.2f} GiB")

def pair_weights(pairs, weighting, top_fraction):
    """-> (pairs, weights): CW-PO's confidence, all ones, or the top-N % most confident pairs with weight 1."""
    if weighting == "none":
        return pairs, [1.0] * len(pairs)
    if any("confidence" not in p for p in pairs):
        raise ValueError(f"--weighting {weighting} needs a 'confidence' in every pair (as train_weak.py writes)")
    confidence = torch.tensor([p["confidence"] for p in pairs], dtype=torch.float32)  # data.py checked: in [0, 1]
    if weighting == "confidence":
        return pairs, confidence.tolist()
    keep = cwpo.top_fraction_mask(confidence, top_fraction).bool().tolist()  # hard selection: the others are dropped
    return [p for p, k in zip(pairs, keep) if k], [1.0] * sum(keep)

@torch.no_grad()
def add_reference_logps(model, examples, batch_size, device, ld_alpha=None, bf16=False):
    """Store the starting model's summed log-probs in each example ("ref_chosen_logps", "ref_rejected_logps"),
    computed as the policy's are in training (ld_alpha, bf16 autocast on CUDA): the first step's log-ratios are 0."""
    model.eval()
    for chunk in data.iterate_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logps = cwpo.sequence_logps(model, batch, ld_alpha=ld_alpha)["logps"]
        chosen, rejected = logps.float().cpu().chunk(2)
        for ex, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r

def lr_at(step, total, args):
    """Linear warmup, then linear decay to 10 % of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (1.0 - 0.9 * (step - args.warmup_steps) / max(1, total - args.warmup_steps))

# Per-micro-batch objectives: (model, batch tensors, the micro-batch's examples, args) -> (summed loss, metrics).
# Each returns a SUM over its examples; train() divides once by the global batch's denominator.

def sft_objective(model, batch, micro, args):
    """Negative log-likelihood of the answer tokens, summed (train() divides by the batch's answer tokens)."""
    logps = cwpo.sequence_logps(model, batch)["logps"]
    return -logps.sum(), {}

def preference_objective(model, batch, micro, args):
    """sum_i w_i * l_i over the micro-batch's pairs, l = args.loss against the stored reference log-probs."""
    device = batch["input_ids"].device
    ref_chosen = torch.tensor([ex["ref_chosen_logps"] for ex in micro], device=device)
    ref_rejected = torch.tensor([ex["ref_rejected_logps"] for ex in micro], device=device)
    return cwpo.batch_loss(model, batch, ref_chosen, ref_rejected, loss_type=args.loss, beta=args.beta,
                           normalize="sum", **args.loss_options)

OBJECTIVES = {"sft": sft_objective, "preference": preference_objective}  # train_weak.py has "bt"

def checkpoints(out):
    """Complete checkpoint folders OUT/checkpoint-STEP, oldest first."""
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n.split("-", 1)[1]))]

def settings(args):
    """What decides a run's result (model, data, every training flag): stored in its checkpoints, compared on resume."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in UNCOMPARED}

def trainable_state(model):
    """{name: tensor} of the parameters that train: all of them, or LoRA's adapters (and an annotator's head)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}

def save_checkpoint(model, optimizer, step, args, rank):
    """The parameters that train (all, or LoRA's adapters) and their AdamW state, gathered whole to rank 0 and
    written into a temporary folder that one rename makes OUT/checkpoint-STEP: a kill at any moment leaves the
    previous checkpoint whole. Older ones are removed."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = trainable_state(model)  # get_model_state_dict keeps a head tied to a frozen embedding
    params = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trained}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:  # every rank took part in gathering
        return
    tmp = os.path.join(args.out, f"checkpoint-{step}.tmp")  # tidy() removed any left by a kill
    os.makedirs(tmp)
    state = {"model": params, "optimizer": optim, "step": step, "settings": settings(args)}
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    os.replace(tmp, os.path.join(args.out, f"checkpoint-{step}"))
    for old in checkpoints(args.out)[:-1]:
        shutil.rmtree(old)

def resume(model, optimizer, args, log):
    """Load the newest complete checkpoint into model and optimizer -> its step (0 when there is none). Refused when
    it was made with other settings or for parameters of other names or shapes."""
    found = checkpoints(args.out)
    if not found:
        return 0
    file = os.path.join(found[-1], "train_state.pt")
    try:  # weights_only: plain tensors and containers, never code that a crafted file would run
        state = torch.load(file, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: not a plain training state ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{file}: unreadable, truncated? ({str(e).splitlines()[0]})") from None
    saved, now = state.get("settings", {}), settings(args)
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {now.get(k)!r} now"
              for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"{found[-1]} was made with other settings: {'; '.join(differ)} (use another --out)")
    shapes = {name: tuple(p.shape) for name, p in trainable_state(model).items()}
    for name in sorted(set(shapes) | set(state["model"])):
        there = tuple(state["model"][name].shape) if name in state["model"] else None
        if there != shapes.get(name):
            raise ValueError(f"{file}: tensor {name} has shape {there}, the model {args.model} {shapes.get(name)}")
    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in a checkpoint
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    log(f"resumed from {found[-1]} at step {state['step']}")
    return state["step"]

def tidy(out, step):
    """Remove what a killed save left (*.tmp) and keep log.jsonl's records up to `step` (none for a fresh run): a step
    run again after a kill is logged once; a last line without its newline is half a record that a kill left."""
    for leftover in (n for n in os.listdir(out) if n.endswith(".tmp")):
        remove(os.path.join(out, leftover))
    path = os.path.join(out, "log.jsonl")
    lines = open(path).read().splitlines(keepends=True) if os.path.exists(path) and step else []
    try:
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise ValueError(f"{path}: not a log of train_policy.py (a line is not a record with a step)") from None
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("".join(kept)))

def claim(out, outputs, args):
    """A run owns its folder: without --resume, an earlier run's checkpoints or outputs in OUT stop the run, or
    are removed first with --overwrite, so that no file of two runs ends up side by side."""
    if args.resume or not os.path.isdir(out):
        return
    found = sorted(n for n in os.listdir(out) if n in outputs or n.startswith("checkpoint-"))
    if found and not args.overwrite:
        raise ValueError(f"--out {out} holds an earlier run's {', '.join(found[:3])}: pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    for name in found:
        remove(os.path.join(out, name))

def remove(path):
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

def train(model, examples, args, objective, rank=0, world_size=1, device=torch.device("cpu"), log=print):
    """Train `model` in place on encoded examples with `objective` (sft_objective, preference_objective, or
    train_weak.bt_objective), one optimizer step per global batch of args.batch_size examples."""
    if not examples:
        raise ValueError("no training examples")
    os.makedirs(args.out, exist_ok=True)
    getattr(model, "body", model).grad_checkpointing = args.grad_checkpointing  # a RewardModel's decoder is .body
    model = shard(model, world_size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters, no per-tensor temporaries (about 5x faster than foreach on CPU)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs
    if total < 1:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    step = resume(model, optimizer, args, log) if args.resume else 0
    if rank == 0:
        tidy(args.out, step)
    t0, seen_tokens, first = time.time(), 0, step
    model.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = [examples[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
        # the one place a loss is normalized: the global batch's summed loss over answer tokens (SFT), over pairs
        # (--normalize mean, the paper's mean of C * l), or over the sum of the pair weights (--normalize sum_w)
        if args.objective == "sft":
            denominator = sum(len(ex["answer_ids"]) for ex in batch)
        elif args.normalize == "sum_w":
            denominator = max(sum(ex["weight"] for ex in batch), 1e-12)
        else:
            denominator = len(batch)
        local = batch[rank::world_size]
        n_micro = min(args.grad_accum, math.ceil(len(batch) / world_size))  # the same on all ranks: each gathers
        totals, n_tokens = {"loss": 0.0}, 0
        for i in range(n_micro):
            micro, share = local[i::n_micro], 1.0
            if not micro:  # this rank's share ran out: an example weighted 0 keeps the ranks' collectives in step
                micro, share = batch[:1], 0.0
            if world_size > 1:  # reduce the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == n_micro - 1)
            tensors = {k: v.to(device) for k, v in data.collate(micro).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
                loss, metrics = objective(model, tensors, micro, args)
            (loss * share / denominator).backward()
            totals["loss"] += share * loss.item() / denominator
            for name, value in metrics.items():  # metrics are means over the micro-batch
                totals[name] = totals.get(name, 0.0) + share * value * len(micro) / len(batch)
            n_tokens += int(share * len(tensors["score_target"]))
        if world_size > 1:  # one vector all-reduce for the logged numbers
            packed = torch.tensor(list(totals.values()) + [n_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(packed)
            totals, n_tokens = dict(zip(totals, packed[:-1].tolist())), int(packed[-1])
        norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)  # over all ranks' shards
        grad_norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
        if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step + 1}: loss {totals['loss']}, gradient norm {grad_norm}; stopped "
                                     "before the update (lower --lr, check the loss options and the confidences)")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen_tokens += n_tokens
        if rank == 0 and (step % args.log_every == 0 or step == total):
            elapsed = time.time() - t0
            eta = elapsed / (step - first) * (total - step)
            record = dict(step=step, epoch=round(step / steps_per_epoch, 3), lr=lr_at(step - 1, total, args),
                          grad_norm=grad_norm, tokens_per_s=seen_tokens / elapsed, elapsed_s=elapsed, **totals)
            shown = " ".join(f"{k} {v:.4f}" for k, v in totals.items())
            log(f"step {step}/{total} | {shown} | {seen_tokens / elapsed:,.0f} tok/s | ETA {eta / 60:.1f} min")
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(model, optimizer, step, args, rank)
    return model

def encode_pairs(tok, pairs, args):
    """Preference pairs -> encoded pairs (data.encode_pair), truncated to --max-prompt-len / --max-answer-len."""
    return [data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len, args.max_answer_len)
            for p in pairs]

def encode_examples(tok, pairs, args):
    """Pairs -> encoded examples: chosen answers only for SFT, else preference pairs with their weights."""
    if args.objective == "sft":
        return [data.encode_prompt_answer(tok, p["prompt"], p["chosen"], args.max_prompt_len, args.max_answer_len)
                for p in pairs]
    pairs, weights = pair_weights(pairs, args.weighting, args.top_fraction)
    if not any(weights):  # every loss would be multiplied by 0: refused rather than trained for nothing
        flag = f"--top-fraction {args.top_fraction}" if args.weighting == "top" else f"--weighting {args.weighting}"
        raise ValueError(f"{args.data}: {flag} leaves no pair with a weight above 0 (nothing to train)")
    examples = encode_pairs(tok, pairs, args)
    for ex, w in zip(examples, weights):
        ex["weight"] = w
    return examples

def load_trainable(args, tok, device, reward=False):
    """args.model to train: all of it in fp32, or with --lora-rank a frozen base (bf16 on CUDA) with LoRA adapters;
    checked to embed tok's ids and --max-prompt-len + --max-answer-len positions (model.check_fits)."""
    modules = args.lora_modules.split(",")
    if args.lora_rank < 0 or not args.lora_alpha > 0 or set(modules) - set(LORA_MODULES):
        raise ValueError(f"--lora-rank must be >= 0, --lora-alpha > 0, --lora-modules a comma list of "
                         f"{','.join(LORA_MODULES)}; got {args.lora_rank}, {args.lora_alpha}, {args.lora_modules!r}")
    dtype = torch.bfloat16 if args.lora_rank and device.type == "cuda" else torch.float32
    model = load_model(args.model, dtype=dtype, device=device, reward=reward)
    check_fits(args.model, model.config, tok, args.max_prompt_len + args.max_answer_len,
               f"--max-prompt-len {args.max_prompt_len} + --max-answer-len {args.max_answer_len}")
    return apply_lora(model, args.lora_rank, args.lora_alpha, modules) if args.lora_rank else model

def main(args):
    rank, world_size, device = distributed()
    torch.manual_seed(args.seed)
    if args.objective == "preference":
        check_loss(args)
    if args.batch_size < world_size:
        raise ValueError(f"--batch-size {args.batch_size} is smaller than the {world_size} ranks: each needs a pair")
    tok = load_tokenizer(args.model)
    model = load_trainable(args, tok, device)
    examples = encode_examples(tok, data.load_pairs(args.data, args.format, skip_bad=args.skip_bad), args)
    if rank == 0:
        claim(args.out, OUTPUTS, args)
        print(f"{len(examples)} examples from {args.data}; model {args.model} on {device}")
        print(memory_line(model.config, args, world_size, device))
    if args.objective == "preference":
        micro_size = max(1, args.batch_size // (world_size * args.grad_accum))  # what fits for training fits here
        add_reference_logps(model, examples, micro_size, device, args.loss_options.get("ld_alpha"), args.bf16)
    model = train(model, examples, args, OBJECTIVES[args.objective], rank, world_size, device)
    model = merge_lora(model)  # on every rank: a sharded model's adapters merge shard by shard
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0
    if rank == 0:
        for name in TOKENIZER_FILES:  # the policy folder is a complete checkpoint; config.json is written last
            if os.path.exists(os.path.join(args.model, name)):
                shutil.copy(os.path.join(args.model, name), os.path.join(args.out, name))
        save_model(model, args.out, state)
        print(f"saved {args.out}")
    if world_size > 1:  # every rank waits for rank 0's save; then leave without gloo's teardown, which can abort
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

def positive_int(text, least=1):  # least 0: a count where 0 means none (--warmup-steps, --save-every)
    if not text.lstrip("-").isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return int(text)

def positive_float(text):  # a learning rate or a gradient-norm limit of 0 trains nothing, a negative one backwards
    if not 0 < float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return float(text)

def check_loss(args):
    """Fail before any work where --loss and --loss-options would fail in training (an unknown name, a clash with a
    flag, a bad value): compute the loss once on a dummy pair. Options of batch_loss itself are checked there."""
    if not isinstance(args.loss_options, dict):
        raise ValueError(f"--loss-options must be a JSON object, got {json.dumps(args.loss_options)}")
    batch_only = {"loss_weights", "ld_alpha", "use_weighting", "chunk_size"}
    options = {k: v for k, v in args.loss_options.items() if k not in batch_only}
    one = torch.ones(1)
    try:
        cwpo.preference_loss(args.loss, -one, -one, -one, -one, args.beta, one, one, **options)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"--loss {args.loss} --loss-options {json.dumps(args.loss_options)}: {e}") from None

def add_training_args(p):
    """Flags shared with train_weak.py: data, model, optimization, logging."""
    count = lambda text: positive_int(text, 0)  # noqa: E731
    p.add_argument("--model", required=True, help="starting checkpoint folder (a policy's is also its reference)")
    p.add_argument("--data", required=True, help="pairs file (.jsonl[.gz] / .parquet): HH-RLHF, TL;DR, UltraFeedback")
    p.add_argument("--format", default="auto", help="data format for data.load_pairs (hh, tldr, ufb, pairs)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--max-steps", type=count, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="pairs (or sequences) per step, all ranks")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step on each rank")
    p.add_argument("--lr", type=positive_float, default=1e-6)
    p.add_argument("--warmup-steps", type=count, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=positive_float, default=10.0)
    p.add_argument("--max-prompt-len", type=positive_int, default=256)
    p.add_argument("--max-answer-len", type=positive_int, default=256)
    p.add_argument("--normalize", default="mean", choices=("mean", "sum_w"),
                   help="divide sum(w * loss) by the pair count or by sum(w)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward: less memory, about 30 %% more compute (TRL's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--save-every", type=count, default=0, help="checkpoint every N steps (0: only the final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-STEP")
    p.add_argument("--overwrite", action="store_true", help="remove an earlier run's outputs from OUT first")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA's update is scaled by alpha / rank")
    p.add_argument("--lora-modules", default=",".join(LORA_MODULES),
                   help="the modules of each block that get adapters, a comma list of " + ",".join(LORA_MODULES))
    return p

def parser():
    p = add_training_args(argparse.ArgumentParser(description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--sft", dest="objective", action="store_const", const="sft", default="preference",
                   help="supervised fine-tuning on the chosen answers instead of preference optimization")
    p.add_argument("--loss", default="sigmoid", help="a loss of cwpo.LOSS_TYPES (sigmoid = DPO, ipo, robust = rDPO)")
    p.add_argument("--loss-options", type=json.loads, default={},
                   help='keyword options of the loss as JSON, e.g. \'{"label_smoothing": 0.1}\'')
    p.add_argument("--beta", type=positive_float, default=0.1)  # 0 trains nothing (IPO: divides by 0)
    p.add_argument("--weighting", default="none", choices=("none", "confidence", "top"),
                   help="per-pair weights: CW-PO is 'confidence'")
    p.add_argument("--top-fraction", type=float, default=0.3, help="--weighting top: the share of pairs kept")
    return p

def run_script(main, args):
    """main(args), with bad input (a missing or unreadable file, a malformed record, a bad value, a loss that
    is no longer finite) reported as one line naming the file, line, key or step: no traceback."""
    try:
        main(args)
    except OSError as e:  # str() names the path; e.args[0] would be the bare errno
        raise SystemExit(f"error: {e}")
    except (ValueError, KeyError, FloatingPointError) as e:
        raise SystemExit(f"error: {e.args[0] if e.args else e}")
    except KeyboardInterrupt:  # one line, the shell's exit status for SIGINT
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)

if __name__ == "__main__":
    run_script(main, parser().parse_args())
