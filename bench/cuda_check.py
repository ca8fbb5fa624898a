"""The CUDA path in one call: what a GPU machine must run once (about 8 minutes on one H100 / H200).

    python bench/cuda_check.py --out cuda-check            # on a GPU machine
    python bench/cuda_check.py --device cpu --small         # a dry run of the same code on CPU (about 2 minutes)

Each check prints one line "PASS | FAIL  name: measured (bound)" and the script exits 1 if any failed:
  kernel     cwpo.token_logps in bf16 (forward and backward) against naive fp32 log-softmax: within bf16's rounding,
             and its extra memory against the naive [N, V] temporaries;
  model      model.py's logits against transformers' on the same random Llama / Qwen2 / GPT-2 / OPT checkpoints, in
             bf16 on the device: our error against fp32 no larger than 2x transformers' own bf16 error;
  generate   greedy KV-cache generation against transformers' generate (fp32): the same tokens;
  train      two DPO steps of train_policy.py under bf16 autocast (--bf16) against the same steps in fp32: losses
             within 2e-2, and the final weights within bf16's step-size noise;
  lora-7b    one LoRA (r 16, every module) DPO step at Qwen2.5-7B's shape with random weights (bf16 frozen base,
             fp32 adapters), 4 pairs of 512 + 2 x 256 tokens, gradient checkpointing: its peak memory beside the estimate;
then, as subprocesses: bench/bench_dpo_step.py --preset qwen2.5-0.5b --device cuda --dtype bfloat16 against TRL,
and python eval.py --quick. Their output is kept in --out.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cwpo  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
from generate import generate  # noqa: E402

RESULTS = []


def report(name, ok, measured, bound):
    RESULTS.append({"check": name, "passed": bool(ok), "measured": measured, "bound": bound})
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured} ({bound})", flush=True)


def check_kernel(device, small):
    torch.manual_seed(0)
    n, d, vocab = (512, 256, 8192) if small else (4096, 896, 151936)
    hidden = (torch.randn(n, d, device=device) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, device=device) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(vocab, (n,), device=device)
    targets[::7] = -100
    sync(device)
    base = memory(device, reset=True)
    logps = cwpo.token_logps(hidden, weight, targets)
    logps.sum().backward()
    sync(device)
    ours_extra = memory(device) - base
    ours = (logps.detach(), hidden.grad.float(), weight.grad.float())
    hidden.grad = weight.grad = None
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    base = memory(device, reset=True)
    full = F.log_softmax(h32 @ w32.t(), dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    full = full * (targets >= 0)
    full.sum().backward()
    sync(device)
    naive_extra = memory(device) - base
    err = (ours[0] - full.detach()).abs().max().item()
    scale = full.detach().abs().max().item()
    report("kernel bf16 log-probs vs fp32", err <= 2e-2 * max(scale, 1.0), f"max |diff| {err:.2e}, |logp| <= {scale:.1f}",
           "<= 2e-2 x max |logp|")
    for name, g, ref in (("hidden", ours[1], h32.grad), ("weight", ours[2], w32.grad)):
        rel = ((g - ref).norm() / ref.norm()).item()
        report(f"kernel bf16 grad {name} vs fp32", rel <= 2e-2, f"relative error {rel:.2e}", "<= 2e-2")
    if device.type == "cuda":
        report("kernel extra memory vs naive fp32", ours_extra < naive_extra / 4,
               f"{ours_extra / 2**20:.0f} MB vs {naive_extra / 2**20:.0f} MB", "< 1/4 of naive")


def tiny_checkpoints(folder):
    """Random tiny checkpoints of the four families, saved by transformers."""
    import transformers
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256),
        "qwen2": transformers.Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256),
        "gpt2": transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "opt": transformers.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64),
    }
    paths = {}
    for family, cfg in configs.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        paths[family] = os.path.join(folder, family)
        hf.save_pretrained(paths[family])
    return paths


@torch.no_grad()
def check_model(device, paths):
    import transformers
    ids = torch.randint(3, 512, (2, 96), device=device)
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0  # right padding in the second row
    for family, path in paths.items():
        hf32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        reference = hf32(ids, attention_mask=mask).logits
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        theirs = (hf16(ids, attention_mask=mask).logits.float() - reference)[mask.bool()].abs().max().item()
        ours16 = M.load_model(path, dtype=torch.bfloat16, device=device).eval()
        ours = (ours16(ids, mask).float() - reference)[mask.bool()].abs().max().item()
        report(f"model {family} bf16 logits vs transformers fp32", ours <= 2 * theirs + 1e-3,
               f"ours {ours:.2e}, transformers bf16 {theirs:.2e}", "ours <= 2 x theirs + 1e-3")


@torch.no_grad()
def check_generate(device, paths):
    import transformers
    for family in ("llama", "gpt2"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(paths[family], dtype=torch.float32).to(device).eval()
        ours = M.load_model(paths[family], dtype=torch.float32, device=device).eval()
        prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 12, 9)]
        new = generate(ours, prompts, 24, eos_id=2, pad_id=0)
        same = True
        for p, row in zip(prompts, new):
            out = hf.generate(torch.tensor([p], device=device), max_new_tokens=24, do_sample=False, eos_token_id=2,
                              pad_token_id=0)[0, len(p):].tolist()
            same &= row == (out[:out.index(2)] if 2 in out else out)
        report(f"generate {family} KV cache vs transformers greedy", same, "identical tokens" if same else "differ",
               "identical tokens")


def check_train(device, paths, folder):
    """Two DPO steps through train_policy.py's command line, bf16 autocast against fp32."""
    import random
    pairs = os.path.join(folder, "pairs.jsonl")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    with open(pairs, "w") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=20)), "chosen": " ".join(rng.choices(words, k=8)),
                                "rejected": " ".join(rng.choices(words, k=6))}) + "\n")
    tok = os.path.join(folder, "tok")
    make_tokenizer(words, tok)
    model_dir = os.path.join(folder, "llama-tok")
    os.makedirs(model_dir, exist_ok=True)
    for name in os.listdir(paths["llama"]):
        os.link(os.path.join(paths["llama"], name), os.path.join(model_dir, name))
    for name in os.listdir(tok):
        os.link(os.path.join(tok, name), os.path.join(model_dir, name))
    losses = {}
    for mode in ("bf16", "no-bf16"):
        out = os.path.join(folder, f"train-{mode}")
        cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--model", model_dir, "--data", pairs,
               "--out", out, "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "0",
               "--log-every", "1", f"--{mode}"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=
                              os.environ.get("CUDA_VISIBLE_DEVICES", "0") if device.type == "cuda" else ""))
        if done.returncode != 0:
            report(f"train {mode}", False, done.stderr.strip().splitlines()[-1:], "exit 0")
            return
        losses[mode] = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    diff = max(abs(a - b) for a, b in zip(losses["bf16"], losses["no-bf16"]))
    report("train DPO steps bf16 autocast vs fp32", diff <= 2e-2, f"losses {losses}", "max |diff| <= 2e-2")


def make_tokenizer(words, folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)


def check_lora_7b(device, small):
    """One LoRA DPO step at Qwen2.5-7B's shape (random weights, never saved): peak memory beside the estimate."""
    import runs
    import train_policy
    from lora import apply_lora
    hf = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, intermediate_size=18944, max_position_embeddings=32768, rms_norm_eps=1e-6,
              tie_word_embeddings=False, hidden_act="silu")
    pairs, prompt_len, answer_len = 4, 512, 256
    if small:
        hf.update(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512)
        prompt_len, answer_len = 64, 32
    torch.manual_seed(0)
    with torch.device("meta"):
        policy = M.GPT(M.config_from_hf(hf))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = policy.to_empty(device=device).to(dtype)
    policy.init_weights()
    apply_lora(policy, rank=16, alpha=32, modules=("qkv", "o", "gate", "up", "down"))
    policy.grad_checkpointing = True
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    tokens = pairs * (prompt_len + 2 * answer_len)  # the packed layout computes each prompt once
    draw = lambda n: torch.randint(3, hf["vocab_size"], (n,)).tolist()  # noqa: E731
    examples = [{"prompt_ids": draw(prompt_len), "chosen_ids": draw(answer_len), "rejected_ids": draw(answer_len)}
                for _ in range(pairs)]
    batch = {k: v.to(device) for k, v in data.collate(examples).items()}
    sync(device)
    memory(device, reset=True)
    t0 = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logps = cwpo.sequence_logps(policy, batch)["logps"]
        chosen, rejected = logps.float().chunk(2)
        loss = cwpo.preference_loss("sigmoid", chosen, rejected, chosen.detach(), rejected.detach(), 0.1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    sync(device)
    seconds, peak = time.time() - t0, memory(device)
    n_params = sum(p.numel() for p in policy.parameters())
    flags = ["--model", "m", "--data", "d", "--out", "o", "--lora-rank", "16", "--batch-size", str(pairs),
             "--max-prompt-len", str(prompt_len), "--max-answer-len", str(answer_len)]  # the step above
    estimate = runs.memory_estimate(policy.config, train_policy.parser().parse_args(flags), 1, device)["total"]
    shown = (f"peak {peak / 2**30:.1f} GiB, {seconds:.1f} s, {tokens} tokens, {n_params / 1e9:.2f}B params; estimate "
             f"(runs.memory_estimate, activations included) {estimate / 2**30:.1f} GiB")
    report("lora-7b one DPO step", bool(torch.isfinite(loss)) and (device.type != "cuda" or peak < 80 * 2**30),
           shown, "finite loss, fits in 80 GB")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device, reset=False):
    """Bytes allocated now (CUDA: the peak since the last reset) on the device; CPU: the process's peak RSS."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def run_logged(name, cmd, out, timeout):
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    tail = open(os.path.join(out, f"{name}.log")).read().strip().splitlines()[-12:]
    print("\n".join(tail), flush=True)
    report(name, ok, f"{time.time() - t0:.0f} s, log in {out}/{name}.log", "exit 0")


def main(args):
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        check_kernel(device, args.small)
        paths = tiny_checkpoints(folder)
        check_model(device, paths)
        check_generate(device, paths)
        check_train(device, paths, folder)
        check_lora_7b(device, args.small)
    if not args.small:
        run_logged("bench_dpo_step", [sys.executable, "bench/bench_dpo_step.py", "--preset", "qwen2.5-0.5b",
                                      "--vocab", "151936", "--device", args.device, "--dtype", "bfloat16",
                                      "--steps", "6", "--warmup", "2"], args.out, 300)
        run_logged("eval_quick", [sys.executable, "eval.py", "--quick", "--out", os.path.join(args.out, "quick")],
                   args.out, 300)
    with open(os.path.join(args.out, "cuda_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    failed = [r["check"] for r in RESULTS if not r["passed"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes, no subprocess benchmarks: a CPU dry run")
    p.add_argument("--out", default="cuda-check")
    sys.exit(main(p.parse_args()))
