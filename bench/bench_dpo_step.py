"""Benchmark: one DPO training step, TRL 1.16's DPOTrainer against ours, same weights, same batch (issue 5).

    python bench/bench_dpo_step.py --json dpo_step.json   # the full default run (CPU, fp32, both V; ~3 min on 2 idle cores)
    python bench/bench_dpo_step.py --vocab 49152 --steps 3 --warmup 1
    python bench/bench_dpo_step.py --preset qwen2.5-0.5b --vocab 151936 --device cuda --dtype bfloat16   # on a GPU
    python bench/bench_dpo_step.py --preset smollm2-135m --vocab 49152 --data data/hh-rlhf-harmless-base-test.jsonl.gz \
        --hh-pairs 24 --pairs 8 --warmup 1 --rounds 2 --variants trl_precompute ours     # real HH-RLHF pairs (issue 15)
    python bench/bench_dpo_step.py --preset smollm2-135m --vocab 49152 --data data/hh-rlhf-harmless-base-test.jsonl.gz \
        --hh-pairs 32 --pairs 8 --warmup 1 --rounds 2 --variants trl_precompute ours \
        --dtype float32 bfloat16       # fp32 and bf16 in one run, interleaved (issue 25; CPU bf16 needs AVX512-BF16/AMX)

With --data: --hh-pairs real pairs (seeded sample), tokenized by --tokenizer (the converted SmolLM2-135M) at
--max-prompt-len + --max-answer-len (256 + 128), a truncated answer's last token made the EOS (TRL appends one).
Each step is a different batch of --pairs: the batches train_policy.train draws in its first epoch, given to TRL
in the same order (its sampler sequential), so both sides train on the same batches and their losses agree step
by step. The step time is the mean over the timed steps; the tokens each side computes (ours: the one packed row,
no padding; TRL: 2 x pairs rows padded to the longest) and the useful FLOPs (real tokens with each prompt once,
attention over the visible (query, key) pairs, the LM head on the answer tokens) are printed, and the matmul
reference is timed at the mean real-token count. --rounds N runs every variant N times interleaved (ABAB); the
table gives each round's mean.

What is built (in the parent process, once per vocabulary size):
  model   a random decoder made by transformers (LlamaForCausalLM; Qwen2ForCausalLM for --preset qwen2.5-0.5b),
          default width 256, 4 layers, 4 heads, 2 KV heads, SwiGLU width 768, untied LM head (28.3M parameters
          at V = 49,152), saved with save_pretrained into a temporary folder; TRL loads it with
          from_pretrained, ours with model.load_model, so both start from the same weights.
  data    --pairs preference pairs (default 4), each a prompt of --prompt-len random token ids and two
          completions of --completion-len ids, the last one EOS; every length equal, so no padding.
          Ours gets them as encoded examples (data.collate's layout); TRL as text over a WordLevel tokenizer
          whose token "t<i>" is id i (and "<eos>" the EOS id, a special token), which maps back to exactly the
          same ids: the TRL child asserts that its tokenized dataset equals ours before training.
          One optimizer step is all --pairs pairs, so every step sees the same batch in both (TRL's sampler
          sequential, ours one batch per epoch), and the loss trajectories can be compared step by step.

The variants, each in a fresh Python subprocess (its own peak RSS) with the same pinned environment:
  trl_ref         DPOTrainer with its default reference: ref_model=None and precompute off, so TRL loads a second
                  copy of the model from the same folder and runs it (no grad) on every step.
  trl_precompute  DPOTrainer with precompute_ref_log_probs=True: reference log-probs computed once in __init__
                  (not timed), no reference model kept. TRL's best configuration.
  ours            train_policy.add_reference_logps (once, not timed) then train_policy.train.
Common settings: loss sigmoid, beta 0.1, AdamW betas (0.9, 0.95) (TRL's adam_beta2 set to ours), eps 1e-8,
weight decay 0, max grad norm --max-grad-norm, learning rate --lr, no warm-up, linear decay to 10 % of the peak
(ours' schedule; TRL's "polynomial" scheduler with power 1 and lr_end = 0.1 lr gives the same one), dropout off,
no logging, no evaluation, no checkpoints, report_to none, fp32 on CPU. TRL keeps its default optimizer
implementation (optim adamw_torch_fused) and its fused chunked LM head (add_fused_lm_head).
With --dtype bfloat16 both run fp32 weights under bf16 autocast (TRL bf16=True, ours --bf16), on CUDA or on a CPU
with native bf16. Several --dtype values run in one process tree: each round runs every (dtype, variant) in turn,
and the matmul reference is timed in fp32 and in bf16, so that every row shows the share of both rates it reaches
(issue 25's goals, printed at the end: ours bf16 >= 3x ours fp32 and >= 4x TRL bf16, <= 0.4x TRL bf16's peak
memory, >= 35 % of the bf16 matmul rate on useful FLOPs).

Per variant:
  loss        the loss at step 0 (log 2 in every variant: policy = reference) and at the last step; the largest
              difference from ours over all steps is printed: it proves the same computation is timed
              (same weights, batch, gradients, clipping, optimizer and schedule).
  s/step      median (and min) wall time per optimizer step after --warmup steps (TRL: between consecutive on_step_end
              callbacks; ours: between consecutive log records of train, --log-every 1). A step is everything the
              training loop does: batch collation, forward, backward, clipping, AdamW, scheduler.
  tokens/s    tokens through the policy per step (2 x pairs x (prompt + completion)) / s/step.
  peak RSS    VmHWM of the child at the end (imports, model(s), optimizer state and the steps all included);
              on CUDA also torch.cuda.max_memory_allocated.
  FLOP/s      counted step FLOPs / s/step, and that as a fraction of the FLOP/s of plain matmuls of the step's
              shapes measured in the same run (a child that times, for every linear layer of the body at
              M = tokens and for the LM head at M = completion positions, the three GEMMs of its forward and
              backward: y = x W^T, dx = dy W, dW = dy^T x). Counted FLOPs (recomputation not counted):
                body    3 x (2 x linear params x tokens + 4 x layers x tokens x seq x d_attn) (fwd + bwd;
                        attention's two batched matmuls over the full seq x seq square)
                head    6 x d x V x the positions each implementation projects through the LM head: ours only
                        those that predict a completion token; TRL on a device without Triton (CPU) all
                        positions, with Triton (CUDA) only the completion ones (trl.trainer.utils.add_fused_lm_head)
                ref     trl_ref also runs the reference forward each step: body/3 + 2 x d x V x projected positions
              "useful" FLOP/s counts the same work for every variant (the body on each prompt once and both
              answers, attention over the visible (query, key) pairs, the head on the completion positions, no
              reference), so its ratio is the speed ratio. The useful FLOPs at the matmul rate give the shortest step
              this machine allows, printed with the largest speed-up over TRL's best it would mean.
Peak RSS with MALLOC_MMAP_MAX_=0 follows the heap's high-water mark, fragmentation included (--live-memory measures
the live peak instead, in a separate run): it moves by
~0.1-0.3 GB between runs of the same code at V = 151,936; compare ratios, and rerun before trusting a small change.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("trl_ref", "trl_precompute", "ours")
EOS_ID = 2  # also the pad id (none is needed: every sequence has the same length)
PRESETS = {  # architecture, width, layers, heads, KV heads, SwiGLU width, tied embeddings
    "tiny": dict(arch="llama", width=256, layers=4, heads=4, kv_heads=2, ffn=768, tie=False),
    "qwen2.5-0.5b": dict(arch="qwen2", width=896, layers=24, heads=14, kv_heads=2, ffn=4864, tie=True),
    "smollm2-135m": dict(arch="llama", width=576, layers=30, heads=9, kv_heads=3, ffn=1536, tie=True),
}


def child_env(args):
    """Environment of every child: set before torch is imported there, identical for every variant."""
    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": args.omp_wait_policy,  # PASSIVE: sleep instead of spin at the end of parallel regions
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",  # TRL's precompute progress bar
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if args.live_memory:  # blocks over 1 MiB go back to the kernel when freed: peak RSS is the live peak, not the
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # heap's high-water mark (times then include page faults)
    elif args.malloc_tuning:
        env["MALLOC_MMAP_MAX_"] = "0"  # glibc: no mmap for large blocks, so no map/unmap + page faults every step
        env["MALLOC_TRIM_THRESHOLD_"] = str(64 * 2**30)  # never give the heap top back to the kernel
    return env


# ----------------------------------------------------------------------------------------------------
# Child processes


def read_status_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field}")


def report(result):
    print("RESULT " + json.dumps(result), flush=True)


def memory_fields(torch, device):
    out = {"peak_rss_bytes": read_status_bytes("VmHWM")}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_trl(args, work, precompute):
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = torch.device(args.device)
    with open(os.path.join(work, "pairs.json")) as f:
        pairs = json.load(f)
    # the batches train_policy.train draws in its first epoch (randperm seeded by --seed 0), in TRL's sequential order
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()]
    vocab = {f"t{i}": i for i in range(args.vocab_size)}
    vocab["<eos>"] = EOS_ID
    del vocab[f"t{EOS_ID}"]
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.add_special_tokens(["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", pad_token="<eos>")

    def text(ids):  # TRL appends the EOS itself
        return " ".join(f"t{i}" for i in ids)

    dataset = Dataset.from_list([{"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"][:-1]),
                                  "rejected": " " + text(p["rejected_ids"][:-1])} for p in pairs])
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"), dtype=torch.float32).to(device)
    config = DPOConfig(
        output_dir=os.path.join(work, f"trl_{'precompute' if precompute else 'ref'}"),
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": 0.1 * args.lr, "power": 1.0},
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=args.max_grad_norm, loss_type=["sigmoid"], beta=0.1, max_length=None,
        precompute_ref_log_probs=precompute, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu", bf16=args.dtype == "bfloat16",
        seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False)

    class Recording(DPOTrainer):
        """DPOTrainer that keeps each step's loss (read after the step; no logging involved)."""
        losses = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((out[0] if return_outputs else out).detach().float().item())
            return out

    step_ends = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(torch, device)
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(torch, device)
            step_ends.append(time.perf_counter())

    trainer = Recording(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    tokenized = [{k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset]
    expected = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]
    if tokenized != expected:
        raise RuntimeError("TRL's tokenized dataset differs from the pairs given to ours")
    rss_before = read_status_bytes("VmRSS")
    trainer.train()
    times = [b - a for a, b in zip(step_ends, step_ends[1:])]
    report({"variant": "trl_precompute" if precompute else "trl_ref", "losses": Recording.losses, "step_times_s": times,
            "rss_before_train_bytes": rss_before, "ref_model": None if precompute else type(trainer.ref_model).__name__,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
            "optim": str(config.optim), **memory_fields(torch, device)})


def run_ours(args, work):
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, REPO_ROOT)
    import train_policy
    from model import load_model

    device = torch.device(args.device)
    with open(os.path.join(work, "pairs.json")) as f:
        examples = json.load(f)
    model_dir, out = os.path.join(work, "model"), os.path.join(work, "ours")
    shutil.rmtree(out, ignore_errors=True)
    policy = load_model(model_dir, dtype=torch.float32, device=device)
    argv = ["--model", model_dir, "--data", os.path.join(work, "pairs.json"), "--out", out, "--max-steps", str(args.steps),
            "--batch-size", str(args.pairs), "--lr", str(args.lr), "--warmup-steps", "0", "--weight-decay", "0",
            "--max-grad-norm", str(args.max_grad_norm), "--loss", "sigmoid", "--beta", "0.1", "--log-every", "1",
            "--seed", "0", "--bf16" if args.dtype == "bfloat16" else "--no-bf16", "--no-grad-checkpointing"]
    train_args = train_policy.parser().parse_args(argv)
    train_policy.add_reference_logps(policy, examples, args.pairs, device, bf16=train_args.bf16)
    rss_before = read_status_bytes("VmRSS")
    train_policy.train(policy, examples, train_args, train_policy.objective_of(train_args), device=device,
                       log=lambda *a: None)
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    elapsed = [0.0] + [r["elapsed_s"] for r in records]
    report({"variant": "ours", "losses": [r["loss"] for r in records],
            "step_times_s": [b - a for a, b in zip(elapsed, elapsed[1:])], "rss_before_train_bytes": rss_before,
            **memory_fields(torch, device)})


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_matmul(args, work):
    """FLOP/s of plain matmuls of the step's shapes: every linear of the body at M = tokens, the LM head at
    M = completion positions; forward and both backward GEMMs of each; median of 5 timed passes after 1."""
    import torch

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with open(os.path.join(work, "shapes.json")) as f:
        shapes = json.load(f)  # [[M, in, out], ...]
    gen = torch.Generator().manual_seed(0)
    operands = []
    for m, k, n in shapes:
        x, w, dy = (torch.randn(a, b, generator=gen).to(device, dtype) for a, b in ((m, k), (n, k), (m, n)))
        operands.append((x, w, dy))
    flops = sum(6 * m * k * n for m, k, n in shapes)
    times = []
    for i in range(6):
        sync(torch, device)
        start = time.perf_counter()
        for x, w, dy in operands:
            x @ w.t(), dy @ w, dy.t() @ x
        sync(torch, device)
        if i:
            times.append(time.perf_counter() - start)
    report({"variant": "matmul", "flops": flops, "time_s": statistics.median(times), "times_s": times,
            "flop_per_s": flops / statistics.median(times)})


# ----------------------------------------------------------------------------------------------------
# Parent process: model, data, FLOP counts, the children, the table


def build_model(args, vocab_size, folder):
    """A random LlamaForCausalLM (or Qwen2ForCausalLM) saved with save_pretrained; returns its shape numbers for the FLOP count."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    family = {"llama": "Llama", "qwen2": "Qwen2"}[args.arch]
    config = getattr(transformers, family + "Config")(vocab_size=vocab_size, hidden_size=args.width, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(2048, args.prompt_len + args.completion_len),
                         tie_word_embeddings=args.tie, bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                         rms_norm_eps=1e-6, initializer_range=0.02)
    torch.manual_seed(args.seed)
    model = getattr(transformers, family + "ForCausalLM")(config).float()
    model.save_pretrained(folder)
    head_dim = args.width // args.heads
    linears = [(m.in_features, m.out_features) for name, m in model.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear)]
    return {"params": sum(p.numel() for p in model.parameters()), "linears": linears,
            "d_attn": args.heads * head_dim}


def make_pairs(args, vocab_size):
    """Deterministic pairs of token ids in data.encode_pair's layout (completions end with EOS)."""
    import random

    rng = random.Random(args.seed)

    def ids(n):
        return [rng.randrange(EOS_ID + 1, vocab_size) for _ in range(n)]

    return [{"prompt_ids": ids(args.prompt_len), "chosen_ids": ids(args.completion_len - 1) + [EOS_ID],
             "rejected_ids": ids(args.completion_len - 1) + [EOS_ID]} for _ in range(args.pairs)]


def make_hh_pairs(args):
    """--hh-pairs real HH-RLHF pairs (a seeded sample of --data), tokenized by --tokenizer as data.encode_pair does at
    --max-prompt-len / --max-answer-len. A truncated answer gets the EOS as its last token (TRL appends one to every
    completion and the ids must be the same on both sides). Ids equal to EOS_ID stand for the tokenizer's EOS."""
    import random

    sys.path.insert(0, REPO_ROOT)
    import data
    import formats
    from formats import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    if tok.eos_id != EOS_ID:
        raise SystemExit(f"{args.tokenizer}: EOS id {tok.eos_id}, the bench needs {EOS_ID} (SmolLM2's)")
    pairs = random.Random(args.seed).sample(formats.load_pairs(args.data), args.hh_pairs)
    encoded = [data.encode_pair(tok, p["prompt"], p["chosen"], p["rejected"], args.max_prompt_len, args.max_answer_len)
               for p in pairs]
    for ex in encoded:
        for key in ("chosen_ids", "rejected_ids"):
            ex[key][-1] = EOS_ID
    return encoded


def hh_step_counts(args, pairs, shape, vocab_size):
    """Per step (the batches train() draws), what each side computes and the useful FLOPs: real tokens with each
    prompt once, attention over the visible (query, key) pairs, the LM head on the answer tokens."""
    import torch

    sys.path.insert(0, REPO_ROOT)
    import data

    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    linear_params = sum(i * o for i, o in shape["linears"])
    steps = []
    for s in range(args.steps):
        batch = [pairs[i] for i in order[s * args.pairs:(s + 1) * args.pairs]]
        lengths = [(len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in batch]
        real = sum(p + c + r for p, c, r in lengths)
        visible = sum(p * (p + 1) // 2 + (c + r) * p + c * (c + 1) // 2 + r * (r + 1) // 2 for p, c, r in lengths)
        scored = sum(c + r for _, c, r in lengths)
        rows = data.collate(batch)["input_ids"]
        useful = (3 * (2 * linear_params * real + 4 * args.layers * shape["d_attn"] * visible)
                  + 3 * 2 * args.width * vocab_size * scored)
        steps.append({"real_once": real, "ours": rows.numel(), "ours_rows": rows.shape[0],
                      "trl": 2 * len(batch) * max(p + max(c, r) for p, c, r in lengths),
                      "real_twice": sum(2 * p + c + r for p, c, r in lengths), "scored": scored, "useful": useful})
    return steps


def step_flops(args, shape, vocab_size):
    """Counted FLOPs of one optimizer step per variant, and the useful FLOPs (see the module docstring)."""
    rows, seq = 2 * args.pairs, args.prompt_len + args.completion_len
    tokens = rows * seq
    completion = rows * (args.completion_len)  # positions whose next token is a completion token
    all_positions = rows * (seq - 1)
    linear_params = sum(i * o for i, o in shape["linears"])
    body_fwd = 2 * linear_params * tokens + 4 * args.layers * tokens * seq * shape["d_attn"]
    head = 2 * args.width * vocab_size  # forward FLOPs per projected position
    trl_projected = completion if (args.device.startswith("cuda") and triton_available()) else all_positions
    p, c = args.prompt_len, args.completion_len  # useful: each prompt once, attention over the visible pairs
    visible = args.pairs * (p * (p + 1) // 2 + 2 * c * p + c * (c + 1))
    useful = 3 * (2 * linear_params * args.pairs * (p + 2 * c) + 4 * args.layers * shape["d_attn"] * visible)
    useful += 3 * head * completion
    return {"tokens": tokens, "useful": useful, "ours_projected": completion, "trl_projected": trl_projected,
            "ours": useful,
            "trl_precompute": 3 * body_fwd + 3 * head * trl_projected,
            "trl_ref": 4 * body_fwd + 4 * head * trl_projected}


def triton_available():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def spawn(args, role, work, vocab_size, dtype):
    """Run this script as a child with the pinned environment; its RESULT line as a dict."""
    env = {**os.environ, **child_env(args), "HF_DATASETS_CACHE": os.path.join(work, "hf_datasets")}
    argv = [sys.executable, os.path.abspath(__file__), "--_child", role, "--_work", work, "--_vocab-size", str(vocab_size),
            "--threads", str(args.threads), "--device", args.device, "--dtype", dtype, "--pairs", str(args.pairs),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", repr(args.lr),
            "--max-grad-norm", repr(args.max_grad_norm)]
    start = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"child {role} {dtype} (V={vocab_size}) failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"child {role} (V={vocab_size}) printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.time() - start
    return result


def summarize(args, vocab, result, flops, matmul, ours_losses, rates):
    timed = result["step_times_s"]  # the timed steps of every round
    step_s = statistics.mean(timed) if args.data else statistics.median(timed)  # real batches differ step to step
    counted = flops[result["variant"]]
    diffs = [abs(a - b) for a, b in zip(result["losses"], ours_losses)]
    return {**result, "vocab": vocab, "step_s": step_s, "min_step_s": min(timed), "timed_steps": len(timed),
            "tokens_per_s": flops["tokens"] / step_s, "flops_per_step": counted, "flop_per_s": counted / step_s,
            "matmul_fraction": counted / step_s / matmul["flop_per_s"],
            "useful_flop_per_s": flops["useful"] / step_s, "matmul_flop_per_s": matmul["flop_per_s"],
            "useful_flops": flops["useful"],
            "useful_matmul_fraction": flops["useful"] / step_s / matmul["flop_per_s"],
            **{f"useful_{d}_fraction": flops["useful"] / step_s / r["flop_per_s"] for d, r in rates.items()},
            "loss_step0": result["losses"][0], "loss_last": result["losses"][-1],
            "max_loss_diff_vs_ours": max(diffs) if diffs else None}


def format_table(rows, device):
    cuda = device.startswith("cuda")
    mem = "CUDA peak GB" if cuda else "peak RSS GB"
    head = (f"{'V':>7} | {'variant':<14} | {'dtype':<8} | {'loss@0':>8} | {'loss@last':>9} | {'|dloss| max':>11} | {'s/step':>7} | {'min s':>6} | "
            f"{'rounds (mean s/step)':>22} | "
            f"{'tokens/s':>8} | {mem:>12} | {'GFLOP/step':>10} | {'GFLOP/s':>7} | {'% matmul':>8} | {'% useful':>8} | "
            f"{'% fp32 mm':>9} | {'% bf16 mm':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = r["cuda_peak_bytes"] if cuda else r["peak_rss_bytes"]
        share = {d: f"{100 * r[f'useful_{d}_fraction']:>8.1f}%" if f"useful_{d}_fraction" in r else f"{'-':>9}"
                 for d in ("float32", "bfloat16")}
        lines.append(f"{r['vocab']:>7} | {r['variant']:<14} | {r['dtype']:<8} | {r['loss_step0']:>8.5f} | {r['loss_last']:>9.5f} | "
                     f"{r['max_loss_diff_vs_ours']:>11.1e} | {r['step_s']:>7.3f} | {r['min_step_s']:>6.3f} | "
                     f"{' '.join(f'{x:.2f}' for x in r['round_step_s']):>22} | {r['tokens_per_s']:>8.0f} | "
                     f"{peak / 1e9:>12.2f} | {r['flops_per_step'] / 1e9:>10.1f} | {r['flop_per_s'] / 1e9:>7.1f} | "
                     f"{100 * r['matmul_fraction']:>7.1f}% | {100 * r['useful_matmul_fraction']:>7.1f}% | "
                     f"{share['float32']} | {share['bfloat16']}")
    return "\n".join(lines)


def ratio_lines(rows, device):
    """ours / TRL for each TRL variant, and the issue's goal against TRL's best (fastest) configuration."""
    key = "cuda_peak_bytes" if device.startswith("cuda") else "peak_rss_bytes"
    lines, goals = [], []
    for vocab, dtype in sorted({(r["vocab"], r["dtype"]) for r in rows}):
        by = {r["variant"]: r for r in rows if r["vocab"] == vocab and r["dtype"] == dtype}
        if "ours" not in by:
            continue
        ours = by["ours"]
        trl = [by[v] for v in ("trl_ref", "trl_precompute") if v in by]
        bound = ours["useful_flops"] / ours["matmul_flop_per_s"]
        line = f"V={vocab} {dtype}: matmul-bound step (useful FLOPs at the matmul rate) {bound:.3f} s"
        if trl:
            line += f" -> at most {min(t['step_s'] for t in trl) / bound:.2f}x faster than TRL's best"
        lines.append(line)
        for t in trl:  # by round: each round ran both sides back to back (ABAB), so its ratio is a paired one
            by_round = ", ".join(f"{a / b:.2f}x" for a, b in zip(t["round_step_s"], ours["round_step_s"]))
            lines.append(f"V={vocab} {dtype}: ours / {t['variant']}: time {ours['step_s'] / t['step_s']:.3f} "
                         f"(speed-up {t['step_s'] / ours['step_s']:.2f}x; by round {by_round}), "
                         f"peak memory {ours[key] / t[key]:.3f}")
        if trl:
            best = min(trl, key=lambda t: t["step_s"])
            speedup, memory = best["step_s"] / ours["step_s"], ours[key] / best[key]
            target_speed, target_memory = 4.0, 0.4  # issue 15's goal
            ok = speedup >= target_speed and memory <= target_memory
            goals.append({"vocab": vocab, "dtype": dtype, "trl_best": best["variant"], "speedup": speedup, "memory_ratio": memory,
                          "met": ok})
            lines.append(f"goal V={vocab} {dtype}: ours >= {target_speed}x faster than TRL's best ({best['variant']}): "
                         f"{speedup:.2f}x -> {'PASS' if speedup >= target_speed else 'FAIL'}; peak memory <= "
                         f"{target_memory} of its: {memory:.3f} -> {'PASS' if memory <= target_memory else 'FAIL'}")
    lines += bf16_goal_lines(rows, key, goals)
    return lines, goals


def bf16_goal_lines(rows, key, goals):
    """Issue 25's goals, where a run has both dtypes: ours bf16 against ours fp32 and TRL's best in bf16."""
    lines = []
    for vocab in sorted({r["vocab"] for r in rows}):
        by = {(r["variant"], r["dtype"]): r for r in rows if r["vocab"] == vocab}
        if ("ours", "bfloat16") not in by or ("ours", "float32") not in by:
            continue
        ours16, ours32 = by[("ours", "bfloat16")], by[("ours", "float32")]
        by_round = ", ".join(f"{a / b:.2f}x" for a, b in zip(ours32["round_step_s"], ours16["round_step_s"]))
        checks = [(f"ours bf16 >= 3x ours fp32 (by round {by_round})", ours32["step_s"] / ours16["step_s"], 3.0),
                  ("ours bf16 useful FLOPs >= 35 % of the bf16 matmul rate", ours16["useful_bfloat16_fraction"], 0.35)]
        trl = [r for (v, d), r in by.items() if d == "bfloat16" and v != "ours"]
        if trl:
            best = min(trl, key=lambda t: t["step_s"])
            by_round = ", ".join(f"{a / b:.2f}x" for a, b in zip(best["round_step_s"], ours16["round_step_s"]))
            checks += [(f"ours bf16 >= 4x {best['variant']} bf16 (by round {by_round})",
                        best["step_s"] / ours16["step_s"], 4.0),
                       (f"ours bf16 peak memory <= 0.4x {best['variant']} bf16's", -ours16[key] / best[key], -0.4)]
        for text, value, target in checks:
            met = value >= target
            goals.append({"vocab": vocab, "goal": text, "value": abs(value), "met": met})
            lines.append(f"goal V={vocab} (issue 25): {text}: {abs(value):.3g} -> {'PASS' if met else 'FAIL'}")
    return lines


def write_json_atomic(path, payload):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def print_header(args, env):
    import torch
    import transformers
    import trl

    seq = args.prompt_len + args.completion_len
    print("DPO training step: TRL DPOTrainer vs ours (train_policy.train), same weights, same batch")
    print(f"  model: random {args.arch} decoder (transformers), width {args.width}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} KV), SwiGLU {args.ffn}, {'tied' if args.tie else 'untied'} LM head; V in {args.vocab}")
    if args.data:
        print(f"  batch: {args.pairs} real pairs a step from {args.data} ({args.hh_pairs} sampled with seed {args.seed}), "
              f"{args.max_prompt_len} + {args.max_answer_len} truncation, a different batch each step, the same on both sides")
    else:
        print(f"  batch: {args.pairs} pairs a step, prompt {args.prompt_len} + completion {args.completion_len} tokens "
              f"-> {2 * args.pairs} x {seq} = {2 * args.pairs * seq} tokens a step, the same batch every step")
    print(f"  training: sigmoid (DPO) loss, beta 0.1, AdamW betas (0.9, 0.95), lr {args.lr:g} decaying linearly to "
          f"10 %, max grad norm {args.max_grad_norm:g}; {args.steps} steps, {'mean' if args.data else 'median'} of the last "
          f"{args.steps - args.warmup} (first {args.warmup} = warm-up)")
    print(f"  device {args.device}, {' and '.join(args.dtype)}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"  torch threads {args.threads}; child env: " + " ".join(f"{k}={v}" for k, v in env.items()))
    print(f"  host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def main(args):
    if args.device.startswith("cuda") and "float32" in args.dtype:
        print("note: --device cuda with --dtype float32 runs fp32 on the GPU (TF32 off)")
    env = child_env(args)
    print_header(args, env)
    rows, matmuls, work_root = [], {}, tempfile.mkdtemp(prefix="bench_dpo_step.")
    try:
        for vocab in args.vocab:
            work = os.path.join(work_root, f"V{vocab}")
            os.makedirs(work)
            shape = build_model(args, vocab, os.path.join(work, "model"))
            pairs = make_hh_pairs(args) if args.data else make_pairs(args, vocab)
            with open(os.path.join(work, "pairs.json"), "w") as f:
                json.dump(pairs, f)
            flops = step_flops(args, shape, vocab)
            tokens = 2 * args.pairs * (args.prompt_len + args.completion_len)
            gemms = [[tokens, i, o] for i, o in shape["linears"]] + [[flops["ours_projected"], args.width, vocab]]
            if args.data:  # real lengths: the useful work of the timed steps, and GEMMs of their mean shapes
                counts = hh_step_counts(args, pairs, shape, vocab)[args.warmup:]
                mean = {k: statistics.mean(c[k] for c in counts) for k in counts[0]}
                flops = {"tokens": mean["ours"], "useful": mean["useful"], **{v: mean["useful"] for v in VARIANTS},
                         "ours_projected": mean["scored"], "trl_projected": mean["scored"]}
                gemms = ([[round(mean["real_once"]), i, o] for i, o in shape["linears"]]
                         + [[round(mean["scored"]), args.width, vocab]])
                print(f"  real HH pairs, mean over the timed steps: {mean['real_once']:.0f} real tokens with each prompt "
                      f"once ({mean['real_twice']:.0f} with it twice); computed: ours {mean['ours']:.0f} "
                      f"({mean['ours_rows']:.0f} packed row), TRL {mean['trl']:.0f} (2 x {args.pairs} padded rows); "
                      f"TRL / ours {mean['trl'] / mean['ours']:.2f}x, ours / real {mean['ours'] / mean['real_once']:.2f}x")
            with open(os.path.join(work, "shapes.json"), "w") as f:
                json.dump(gemms, f)
            print(f"V={vocab}: {shape['params'] / 1e6:.1f}M parameters; LM head projects {flops['ours_projected']:.0f} "
                  f"positions a step in ours, {flops['trl_projected']:.0f} in TRL", flush=True)
            rates = {}  # the matmul reference in each dtype run (both, where bf16 is)
            for dtype in ["float32", "bfloat16"] if "bfloat16" in args.dtype else args.dtype:
                rates[dtype] = spawn(args, "matmul", work, vocab, dtype)
                print(f"  matmul reference (step's GEMM shapes), {dtype}: {rates[dtype]['flop_per_s'] / 1e9:.1f} "
                      f"GFLOP/s", flush=True)
            matmuls[vocab] = rates
            results = {}
            runs = [(d, v) for d in args.dtype for v in ["ours"] + [v for v in args.variants if v != "ours"]]
            for rnd in range(args.rounds):  # ABAB: every (dtype, variant) once per round, in the same order
                for dtype, variant in runs:  # ours first in each dtype: its losses
                    r = spawn(args, variant, work, vocab, dtype)
                    r["dtype"] = dtype
                    r["step_times_s"] = r["step_times_s"][args.warmup:]
                    r["round_step_s"] = [statistics.mean(r["step_times_s"])]
                    optimizer = f", TRL optim {r['optim'].split('.')[-1].lower()}" if "optim" in r else ""
                    print(f"  round {rnd + 1} {variant} {dtype}: {statistics.median(r['step_times_s']):.3f} s/step median, "
                          f"{r['round_step_s'][0]:.3f} mean, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, losses "
                          f"{' '.join(f'{x:.5f}' for x in r['losses'])} ({r['wall_s']:.0f} s wall{optimizer})", flush=True)
                    if (dtype, variant) in results:  # merge the rounds: all timed steps, the highest peak
                        kept = results[(dtype, variant)]
                        kept["step_times_s"] += r["step_times_s"]
                        kept["round_step_s"] += r["round_step_s"]
                        for key in ("peak_rss_bytes", "cuda_peak_bytes"):
                            if key in r:
                                kept[key] = max(kept[key], r[key])
                    else:
                        results[(dtype, variant)] = r
            for dtype in args.dtype:
                for variant in VARIANTS:
                    if (dtype, variant) in results and variant in args.variants:
                        rows.append(summarize(args, vocab, results[(dtype, variant)], flops, rates[dtype],
                                              results[(dtype, "ours")]["losses"], rates))
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    print()
    print(format_table(rows, args.device))
    print()
    lines, goals = ratio_lines(rows, args.device)
    for line in lines:
        print(line)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json_atomic(args.json, {"settings": settings, "env": env, "host": platform.processor() or platform.machine(),
                                      "matmul": {str(k): v for k, v in matmuls.items()}, "rows": rows, "goals": goals})
        print(f"wrote {args.json}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="vocabulary sizes (SmolLM2, Qwen2.5)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape; the flags below override it")
    p.add_argument("--arch", choices=("llama", "qwen2"))
    p.add_argument("--width", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn", type=int, help="SwiGLU intermediate size")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie the LM head to the embedding")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per optimizer step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=64, help="completion tokens, the EOS included")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and OMP/MKL_NUM_THREADS of the children")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"))
    p.add_argument("--live-memory", action="store_true",
                   help="MALLOC_MMAP_THRESHOLD_=1 MiB instead of the tuning: peak RSS of live memory, slower steps")
    p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_ in the children")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                   help="bfloat16: fp32 weights under bf16 autocast (CUDA, or a CPU with bf16); several: one run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved (ABAB)")
    p.add_argument("--data", help="real pairs (e.g. data/hh-rlhf-harmless-base-test.jsonl.gz) instead of random ids: "
                                  "--hh-pairs of them, a different batch of --pairs each step")
    p.add_argument("--hh-pairs", type=int, default=40)
    p.add_argument("--tokenizer", default=os.path.join(REPO_ROOT, "models", "smollm2-135m"),
                   help="tokenizer folder for --data (the converted SmolLM2-135M, see README)")
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-answer-len", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the results here (atomically)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_vocab-size", dest="vocab_size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args._child:  # a child runs one dtype
        args.dtype = args.dtype[0]
    elif "bfloat16" in args.dtype and not args.device.startswith("cuda"):
        sys.path.insert(0, REPO_ROOT)
        from runs import require_cpu_bf16
        require_cpu_bf16("--dtype bfloat16")
    if args.data:  # one epoch of distinct batches
        args.steps = args.hh_pairs // args.pairs
        args.prompt_len, args.completion_len = args.max_prompt_len, args.max_answer_len  # for the model's max positions
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.completion_len < 2 or args.prompt_len < 1:
        p.error("need --prompt-len >= 1 and --completion-len >= 2")
    if args.width % args.heads or args.heads % args.kv_heads:
        p.error("--width must be a multiple of --heads, and --heads of --kv-heads")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args._child == "matmul":
        run_matmul(args, args._work)
    elif args._child in ("trl_ref", "trl_precompute"):
        run_trl(args, args._work, precompute=args._child == "trl_precompute")
    elif args._child == "ours":
        run_ours(args, args._work)
    else:
        main(args)
