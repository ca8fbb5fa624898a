"""A training run's folder and process, around the method: which flags a run takes as valid, how bad input is
reported (one line, no traceback), the run's ownership of --out, atomic writes, checkpoints and resume,
torchrun and FSDP2, and the memory a run will need. train_policy.py and train_weak.py train through these;
none of it changes what is computed.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import pathlib
import pickle
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import cwpo

def run_script(main, args, standalone=False):
    """main(args), with bad input (a missing or unreadable file, a malformed record, a bad value, a loss that
    is no longer finite) reported as one line naming the file, line, key or step: no traceback. An --out that
    the run made and left empty is removed. standalone (a script's __main__): the process then ends at once
    with its exit status, skipping the interpreter's teardown, where pyarrow's threads beside torch's could
    abort it ("terminate called without an active exception", exit 134) after a clean run or its one line."""
    out = getattr(args, "out", None)
    made = bool(out) and not os.path.exists(out)
    status = 0
    try:
        report_errors(main, args)
    except SystemExit as e:
        if not standalone:
            raise
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    finally:
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
    if standalone:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

def report_errors(main, args):
    """main(args), its errors as one line (run_script)."""
    try:
        main(args)
    except OSError as e:  # str() names the path; e.args[0] would be the bare errno
        raise SystemExit(f"error: {e}")
    except (ValueError, KeyError, FloatingPointError) as e:
        raise SystemExit(f"error: {e.args[0] if e.args else e}")
    except KeyboardInterrupt:  # one line, the shell's exit status for SIGINT
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")

def copy_tokenizer(source, out):
    """Copy the tokenizer files of the model folder `source` into `out`: every model folder a run writes is
    read with its own tokenizer."""
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out, name))

def positive_int(text, least=1):  # least 0: a count where 0 means none (--warmup-steps, --save-every)
    if not text.lstrip("-").isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return int(text)

def fraction_or_count(text):
    """A share in [0, 1) or a whole count >= 1 (--eval-size): neither 1.5, nor inf, nor nan."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value < 1 or (1 <= value < math.inf and value.is_integer())):
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) or a whole count, got {text!r}")
    return int(value) if value >= 1 else value

def positive_float(text):  # a learning rate or a gradient-norm limit of 0 trains nothing, a negative one backwards
    if not 0 < float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return float(text)

def atomic_write(path, write):
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path`: never half a file.
    The file gets the mode a plain open() would give it (the umask's), not mkstemp's private 0600."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def clear_checkpoint(path):
    """Before a save into the folder `path`: remove its config.json (written last, so that a folder with one holds a
    whole model) and an earlier sharded save (its index and shards). -> config.json's path."""
    os.makedirs(path, exist_ok=True)
    config_file = os.path.join(path, "config.json")
    if os.path.exists(config_file):
        os.remove(config_file)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # read before model.safetensors: it goes, with its shards
        shards = {os.path.basename(f) for f in read_json(index).get("weight_map", {}).values()}
        os.remove(index)
        for shard in shards & set(os.listdir(path)):
            os.remove(os.path.join(path, shard))
    return config_file

def claim(out, outputs, args):
    """A run owns its folder: without --resume, an earlier run's checkpoints or outputs in OUT stop the run, or
    are removed first with --overwrite, so that no file of two runs ends up side by side. With --resume, OUT
    must hold a run to continue: a finished run's outputs without a checkpoint are never replaced. An OUT that
    is an input (or inside one), or that would remove or rewrite an input, is refused."""
    found = sorted(n for n in os.listdir(out) if n in outputs or n.startswith("checkpoint-")) \
        if os.path.isdir(out) else []
    check_inputs(out, outputs, args)

    if args.resume:
        finished = [n for n in found if n != "log.jsonl" and not n.startswith("checkpoint-")]
        if finished and not checkpoints(out):
            raise ValueError(f"--out {out} holds a finished run's {', '.join(finished[:3])} and no checkpoint "
                             "to resume: leave out --resume and pass --overwrite to replace it, or another --out")
        return

    if found and not args.overwrite:
        raise ValueError(f"--out {out} holds an earlier run's {', '.join(found[:3])}: pass --resume to continue "
                         "it, --overwrite to replace it, or another --out")
    for name in found:
        remove(os.path.join(out, name))

INPUTS = ("model", "data", "unlabeled")  # the flags whose files a run reads

def check_inputs(out, outputs, args):
    """Refuse an OUT that is an input folder or lies inside one, and an input that lies among OUT's outputs
    (which the run removes or rewrites): the input stays intact."""
    target = os.path.realpath(out)
    for flag in INPUTS:
        path = getattr(args, flag, None)
        if not path:
            continue
        source = os.path.realpath(path)
        if target == source or target.startswith(source + os.sep):
            raise ValueError(f"--out {out} is --{flag} {path} or inside it: write the output elsewhere")
        part = os.path.relpath(source, target).split(os.sep)[0]
        if source.startswith(target + os.sep) and (part in outputs or part.startswith("checkpoint-")):
            raise ValueError(f"--{flag} {path} is an output of --out {out}, which the run would replace: "
                             "copy it elsewhere first")

def remove(path):
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

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
    if kept:
        atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("".join(kept)))
    elif os.path.exists(path):  # an empty log would stop the next run as an earlier run's
        os.remove(path)

UNCOMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "max_steps", "epochs")  # see `run` below
LABELS = {"steps": "the run's length in steps (--max-steps, --epochs)",
          "data_sha256": "the encoded data's sha256 (--data)"}

def settings(args, run):
    """What decides a run's result (model, data, every training flag, and `run`: its length in steps and the
    sha256 of the examples it trains on): stored in its checkpoints, compared on resume."""
    flags = {k: v for k, v in vars(args).items() if k not in UNCOMPARED}
    return dict(sorted({**flags, **run}.items()))

def fingerprint(examples):
    """sha256 of encoded examples (token ids, weights; not the reference log-probs computed from them): what a
    run trains on, wherever its file lies and whatever its name."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr(sorted((k, v) for k, v in example.items() if not k.startswith("ref_"))).encode())
    return digest.hexdigest()

def checkpoints(out):
    """Complete checkpoint folders OUT/checkpoint-STEP, oldest first."""
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n.split("-", 1)[1]))]

def trainable_state(model):
    """{name: tensor} of the parameters that train: all of them, or LoRA's adapters (and an annotator's head)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}

def save_checkpoint(model, optimizer, step, args, rank, run):
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
    state = {"model": params, "optimizer": optim, "step": step, "settings": settings(args, run)}
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    os.replace(tmp, os.path.join(args.out, f"checkpoint-{step}"))
    for old in checkpoints(args.out)[:-1]:
        shutil.rmtree(old)

STATE = {"model": dict, "optimizer": dict, "step": int, "settings": dict}  # a train_state.pt's keys

def resume(model, optimizer, args, log, run):
    """Load the newest complete checkpoint into model and optimizer -> its step (0 when there is none). Refused when
    it was made with other settings (`run`: see settings) or does not fit: any value of its train_state.pt that
    is not what save_checkpoint writes is one line naming the file."""
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
    check_state(state, file, trainable_state(model), run["steps"])

    saved, now = state["settings"], settings(args, run)
    differ = [f"{LABELS.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} there, {now.get(k)!r} now"
              for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"{found[-1]} was made with other settings: {'; '.join(differ)} (use another --out)")
    if state["step"] != int(found[-1].rsplit("-", 1)[1]):
        raise ValueError(f"{file}: step {state['step']} in the folder of step {found[-1].rsplit('-', 1)[1]}")

    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in a checkpoint
    set_model_state_dict(model, state["model"], options=options)
    try:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
        raise ValueError(f"{file}: the optimizer state does not fit the model ({e!r})") from None
    log(f"resumed from {found[-1]} at step {state['step']}")
    return state["step"]

def check_state(state, file, trained, steps):
    """A train_state.pt's content as save_checkpoint writes it, or a ValueError naming the file and the key: its
    keys and their types, a step inside the run, each tensor of the model's name, shape and dtype, and every
    tensor (the optimizer's too) finite."""
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a training state (a {type(state).__name__}, not a dict)")
    for key, kind in STATE.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{file}: key {key!r} is missing or not a {kind.__name__}")
    if not 0 < state["step"] < steps:
        raise ValueError(f"{file}: step {state['step']} lies outside the run's {steps} steps")

    for name in sorted(set(trained) | set(state["model"])):
        there, here = state["model"].get(name), trained.get(name)
        if not isinstance(there, torch.Tensor) or here is None or there.shape != here.shape:
            shape = tuple(there.shape) if isinstance(there, torch.Tensor) else None
            here_shape = None if here is None else tuple(here.shape)
            raise ValueError(f"{file}: tensor {name} has shape {shape}, the model {here_shape}")
        if there.dtype != here.dtype:
            raise ValueError(f"{file}: tensor {name} has dtype {there.dtype}, the model {here.dtype}")

    tensors = [("model", state["model"]), ("optimizer", state["optimizer"])]
    while tensors:
        where, value = tensors.pop()
        if isinstance(value, dict):
            tensors += [(f"{where}.{k}", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            tensors += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not value.isfinite().all():
            raise ValueError(f"{file}: {where} holds NaN or inf")

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
    attention q, k, v, the output (o reads a view of it) and the logsumexp 2q + 2kv + H, Qwen3's q / k norms
    their input (the q|k|v output) and statistics q + 2kv + H + Hkv, and the MLP's: SwiGLU's g and u 2f (3f with
    down's input where LoRA wraps down), GELU's input and output 2f, ReLU's output f; q / k norms: 2 hd
    parameters; checkpointed, a block keeps only its input d, and one block is recomputed at a time. The fused LM
    head holds min(N, 256) V fp32 logits."""
    d, q, kv, f, r = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.rope
    e, norm = cfg.proj_dim or d, d * (2 - r)  # LayerNorm: + bias
    linears = {"qkv": (d, q + 2 * kv, cfg.qkv_bias), "o": (q, d, cfg.o_bias), "gate": (d, f * r, cfg.mlp_bias),
               "up": (d, f, cfg.mlp_bias), "down": (f, d, cfg.mlp_bias)}  # gate: SwiGLU families only
    block = sum(i * o + o * bias for i, o, bias in linears.values()) + 2 * norm + 2 * cfg.head_dim * cfg.qk_norm
    root = cfg.vocab_size * e + norm * cfg.final_norm + 2 * e * d * bool(cfg.proj_dim)
    root += (0 if r else (cfg.max_pos + 2 * (cfg.model_type == "opt")) * d) + (e if reward else 0)
    root += cfg.vocab_size * e * (not cfg.tie_word_embeddings and not reward)  # an untied LM head
    total, base = root + cfg.n_layer * block, 2 if args.lora_rank and device.type == "cuda" else 4
    trained = cfg.n_layer * sum(args.lora_rank * (i + o) for m, (i, o, _) in linears.items()
                                if m in args.lora_modules.split(",") and o) if args.lora_rank else total
    pairs = math.ceil(math.ceil(args.batch_size / world_size) / args.grad_accum)  # train's micro-batch
    length = args.max_prompt_len + (1 if args.objective == "sft" else 2) * args.max_answer_len
    fused = cfg.act == "silu" and r and not (args.lora_rank and "down" in args.lora_modules.split(","))
    mlp = 2 if fused else 2 + r - (cfg.act == "relu")  # f's a token: SwiGLUDown recomputes down's input
    saved = 4 * d + 4 - 2 * r + 2 * q + 2 * kv + cfg.n_head + mlp * f  # a block, a token
    saved += (q + 2 * kv + cfg.n_head + cfg.n_kv_head) * cfg.qk_norm
    size = 2 if bf16_enabled(args.bf16, device) or args.lora_rank and device.type == "cuda" else 4
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


def read_json(path):
    """A JSON file's content; malformed JSON raises a ValueError that names the file."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

def write_jsonl(path, records):
    """records as JSON lines, atomically (atomic_write)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))

def is_count(value):
    return type(value) is int and value >= 1

def is_positive(value):
    return type(value) in (int, float) and 0 < value < math.inf

# config.json key -> (test of its value, what it must be); a key absent or null is not tested
CONFIG_CHECKS = {
    **dict.fromkeys(("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
                     "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "ffn_dim",
                     "max_position_embeddings", "word_embed_proj_dim", "sliding_window",
                     "original_max_position_embeddings"), (is_count, "an integer >= 1")),
    **dict.fromkeys(("layer_norm_epsilon", "rms_norm_eps", "rope_theta", "factor",
                     "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"),
                    (is_positive, "a positive number")),
    "initializer_range": (lambda v: v == 0 or is_positive(v), "a number >= 0"),
    **dict.fromkeys(("tie_word_embeddings", "do_layer_norm_before", "enable_bias", "attention_bias",
                     "mlp_bias", "_remove_final_layer_norm", "use_sliding_window"),
                    (lambda v: type(v) is bool, "true or false")),
    **dict.fromkeys(("rope_parameters", "rope_scaling"), (lambda v: isinstance(v, dict), "an object")),
}

def check_config(hf, file, activations):
    """Every value of config.json that model.config_from_hf reads, checked once against CONFIG_CHECKS,
    the activation against `activations` and the special token ids against the vocabulary: a
    ValueError naming the file and the key."""
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: not a JSON object but a {type(hf).__name__}")
    nested = [hf[k] for k in ("rope_parameters", "rope_scaling") if isinstance(hf.get(k), dict)]
    for key, value in [item for part in (hf, *nested) for item in part.items()]:
        test, must = CONFIG_CHECKS.get(key, (None, None))
        if key in ("activation_function", "hidden_act"):
            test, must = (lambda v: v in activations), "one of " + ", ".join(activations)
        if test and value is not None and not test(value):
            raise ValueError(f"{file}: key {key!r} must be {must}, got {json.dumps(value)}")

    vocab = hf.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = hf.get(key) if isinstance(hf.get(key), list) else [hf.get(key)]
        if is_count(vocab) and any(i is not None and not (type(i) is int and 0 <= i < vocab) for i in ids):
            raise ValueError(f"{file}: key {key!r} must be a token id below vocab_size {vocab}, "
                             f"got {json.dumps(hf[key])}")

def check_scored(examples, args):
    """Refuse a run whose answers lost every token to truncation (nothing to train); the
    annotator's score is read at the last token, always there."""
    answers = [k for k in ("answer_ids", "chosen_ids", "rejected_ids") if k in examples[0]]
    scored = any(len(ex[k]) > (not ex["prompt_ids"]) for ex in examples for k in answers)  # collate
    if args.objective != "bt" and not scored:
        raise ValueError(f"{args.data}: no answer token left to score after truncation to "
                         f"--max-prompt-len {args.max_prompt_len} / --max-answer-len "
                         f"{args.max_answer_len} (nothing to train)")

def check_fits(model_path, cfg, tok, length, what, cache=False):
    """Fail before any work where the model cannot embed its input: token ids or (GPT-2, OPT)
    `length` positions; or where a sliding window (Mistral, Qwen's use_sliding_window) would cut
    `length` tokens: the window is not applied, so it is refused. With cache=True (generation's KV
    cache, allocated whole) `length` is checked against max_position_embeddings for RoPE too."""
    if tok.get_vocab_size() > cfg.vocab_size:
        config_file = os.path.join(model_path, "config.json")
        raise ValueError(f"{getattr(tok, 'file', 'the tokenizer')} has {tok.get_vocab_size()} "
                         f"tokens, more than the vocab_size {cfg.vocab_size} of {config_file}")
    if (cache or not cfg.rope) and length > cfg.max_pos:
        raise ValueError(f"{what} exceed {model_path}'s max_position_embeddings {cfg.max_pos}")
    if cfg.sliding_window and length > cfg.sliding_window:
        raise ValueError(f"{what} exceed {model_path}'s sliding_window {cfg.sliding_window} "
                         "(config.json): sliding-window attention is not supported")

# ----------------------------------------------------------------------------------- bf16

@functools.cache
def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

def require_cpu_bf16(flag):
    """Refuse `flag` in one line on a CPU without native bf16, where a benchmark would time fp32 as bf16."""
    if not cpu_has_bf16():
        raise SystemExit(f"error: {flag} needs a CPU with native bf16 (AVX512-BF16 or AMX), which this one lacks")

def bf16_enabled(flag, device):
    """--bf16 (True, False, or None: the device's default) -> whether to run bf16 autocast on `device`.

    Default on CUDA; opt-in on CPU, where fp32 keeps the results exact (the parity tests, eval.py's table).
    A CPU without native bf16 keeps fp32, with one line saying so.
    """
    if device.type != "cpu":
        return flag is not False

    if flag and not cpu_has_bf16():
        no_bf16_notice()
    return bool(flag) and cpu_has_bf16()

@functools.cache
def no_bf16_notice():
    """The one line a --bf16 run on a CPU without bf16 prints (once a process)."""
    print("--bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); running fp32")

def add_training_args(p):
    """The training flags of train_policy.py and train_weak.py: data, model, optimization, logging."""
    from lora import LORA_MODULES  # lora imports model, which imports this module
    count = lambda text: positive_int(text, 0)  # noqa: E731
    p.add_argument("--model", required=True, help="starting checkpoint folder (a policy's is also its reference)")
    p.add_argument("--data", required=True, help="pairs file (.jsonl[.gz] / .parquet): HH-RLHF, TL;DR, UltraFeedback")
    p.add_argument("--format", default="auto", help="data format for formats.load_pairs (hh, "
                   "tldr, ufb, pairs; hh-chat: HH-RLHF as user / assistant turns)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="conversational data rendered with the chat template (TRL); off: plain")
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
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on CUDA; opt-in on a CPU with AVX512-BF16 / AMX)")
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
