"""Benchmark: per-token log-probs of the LM head, forward + backward, four ways (issue 3, section 1).

    python bench/bench_logprobs.py                       # the full default run (CPU, fp32, ~5 minutes)
    python bench/bench_logprobs.py --vocab 32000 --repeats 1 --json /tmp/logprobs.json
    python bench/bench_logprobs.py --device cuda --dtype bfloat16

Every variant takes the same final hidden states [N, d] (N = batch x seq positions), the LM head weight [V, d]
and the next-token ids [N]; half of the positions are completion tokens (a contiguous span of seq/2 tokens
per row, at a random offset), the others are prompt. Each returns per-token log-probs [N] in fp32 (0 on
prompt positions) and the gradients of the hidden states and of the head weight for a fixed random upstream
gradient:
  naive         (hidden @ W.T).float().log_softmax(-1).gather(targets), full logits over all N positions,
                then masked -- what a trainer that asks the model for logits does;
  trl_selective TRL's trl.trainer.utils.selective_log_softmax over the same full logits [B, T, V];
  trl_chunked   TRL's trl.kernels.ChunkedLogProbFunction, called as DPOTrainer's fused LM head calls it
                (trl.trainer.utils.add_fused_lm_head): on a device without Triton (CPU) it scores all N
                positions and masks afterwards; with Triton (CUDA) only the completion positions;
                chunk size = TRL's _CHUNKED_LOGPROB_CHUNK_SIZE; outputs: see --trl-outputs;
  ours          cwpo.token_logps (cwpo.FusedLogProbs) over the N/2 completion positions only.

Each (V, variant) runs in a fresh Python subprocess whose environment pins the threads and glibc's allocator
(see child_env; set before torch is imported, the same for every variant): build the inputs, one pass to
measure memory, one warm-up pass, then `--repeats` timed forward + backward passes; the median is reported.
Extra memory is what a variant holds beyond its inputs and the two gradients every variant returns (grad of
the hidden states, grad of the head weight, in the inputs' dtype):
  CPU:  VmHWM minus VmRSS once the inputs exist (the high-water mark is reset there by writing 5 to
        /proc/self/clear_refs), minus the gradients' bytes. For this pass only, glibc is switched (mallopt) to
        one mmap per block >= 1 MiB, so freed blocks leave RSS at once and the high-water mark is the peak of
        the bytes held. It is the process's first full-size pass, so it also counts what the libraries keep
        after their first full-size call (about 10 MB here, the same for every variant). Under the timing
        setting (MALLOC_MMAP_MAX_=0, no trim) the heap fragments and its high-water mark drifts up from pass
        to pass by up to a logits-sized block, which is the allocator's doing, not the variant's. The timed
        passes run under the timing setting.
  CUDA: torch.cuda.max_memory_allocated minus memory_allocated once the inputs exist, minus the gradients' bytes.
The gradients are subtracted by size even when a variant's peak comes before they are allocated (naive and
trl_selective peak inside log_softmax's backward); there the figure is a lower bound of what the variant
holds beyond inputs + gradients, which makes the ratio `ours / naive` look worse, not better.

Before timing, a small fp32 case checks that all four variants give the same log-probs and gradients.
"""

import argparse
import ctypes
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("naive", "trl_selective", "trl_chunked", "ours")
# Outputs DPOTrainer 1.16 asks of the policy's fused head (dpo_trainer.py); the reference model asks only log_probs.
TRL_DPO_POLICY_OUTPUTS = ("entropy", "mean_logits", "is_top1")
CHECK_TOLERANCE = 1e-4  # fp32, max abs error of log-probs; max abs error / max abs value of the gradients


def child_env(threads):
    """Environment of every child process: set before torch is imported there (same for every variant)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",  # sleep instead of spin-waiting at the end of parallel regions
        "MALLOC_MMAP_MAX_": "0",  # no mmap for large blocks: no map/unmap (and page faults) at every call
        "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),  # never give the heap top back to the kernel
        "PYTHONHASHSEED": "0",
    }


# ----------------------------------------------------------------------------------------------------
# Child process: the variants, the correctness check and one measurement


def read_status_kb(field):
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field}")


def reset_peak_rss():
    """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(batch, seq, dim, vocab, dtype, device, seed=0):
    """hidden [N, d] and weight [V, d] (leaves that need grad), targets [N], completion mask [N], upstream grad [N]."""
    import torch

    n = batch * seq
    gen = torch.Generator().manual_seed(seed)
    # Filled in place, in their final dtype, so that building them leaves no temporary above the final RSS.
    hidden = torch.empty(n, dim, dtype=dtype).normal_(generator=gen)
    weight = torch.empty(vocab, dim, dtype=dtype).normal_(std=dim**-0.5, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):  # seq // 2 completion tokens per row, after a prompt of random length
        start = int(torch.randint(0, seq - seq // 2 + 1, (1,), generator=gen))
        mask[row, start : start + seq // 2] = True
    grad_out = torch.randn(n, generator=gen)
    hidden, weight = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    return hidden, weight, targets.to(device), mask.view(-1).to(device), grad_out.to(device)


def load_variant(name, chunk_size, trl_outputs):
    """A function (hidden, weight, targets, mask, batch) -> log-probs [N] fp32, 0 where mask is False."""
    import torch

    if name == "naive":

        def naive(hidden, weight, targets, mask, batch):
            logps = (hidden @ weight.t()).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
            return logps.masked_fill(~mask, 0.0)

        return naive

    if name == "trl_selective":
        from trl.trainer.utils import selective_log_softmax

        def trl_selective(hidden, weight, targets, mask, batch):
            logits = (hidden @ weight.t()).view(batch, -1, weight.shape[0])  # [B, T, V], TRL loops over B
            logps = selective_log_softmax(logits, targets.view(batch, -1), row_mask=mask.view(batch, -1))
            return logps.view(-1).float().masked_fill(~mask, 0.0)

        return trl_selective

    if name == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.kernels.chunked_logprob import _use_triton
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        trl_chunk = chunk_size or _CHUNKED_LOGPROB_CHUNK_SIZE

        def trl_chunked(hidden, weight, targets, mask, batch):
            # As add_fused_lm_head's forward: (temperature, chunk, softcap, logit_scale, outputs)
            if _use_triton(hidden.device):  # compact: only the scored positions
                out = ChunkedLogProbFunction.apply(
                    hidden[mask], weight, None, targets[mask], 1.0, trl_chunk, None, 1.0, trl_outputs
                )
                return out[0].new_zeros(mask.shape).masked_scatter(mask, out[0])
            out = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, trl_chunk, None, 1.0, trl_outputs)
            return out[0].masked_fill(~mask, 0.0)

        return trl_chunked

    if name == "ours":
        sys.path.insert(0, REPO_ROOT)
        import cwpo

        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}

        def ours(hidden, weight, targets, mask, batch):
            rows = mask.nonzero().squeeze(1)  # project only the completion positions
            logps = cwpo.token_logps(hidden.index_select(0, rows), weight, targets.index_select(0, rows), **kwargs)
            return logps.new_zeros(mask.shape).index_put((rows,), logps)

        return ours

    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def forward_backward(fn, hidden, weight, targets, mask, grad_out, batch):
    """Log-probs [N] and the two gradients (hidden, weight), as every variant must return them."""
    import torch

    logps = fn(hidden, weight, targets, mask, batch)
    grad_hidden, grad_weight = torch.autograd.grad(logps, (hidden, weight), grad_out)
    return logps.detach(), grad_hidden, grad_weight


def run_check(args):
    """All variants agree with each other in fp32 on a small case (chunk sizes that do not divide N or V)."""
    import torch

    torch.set_num_threads(args.threads)
    batch, seq, dim, vocab = 3, 37, 48, 1003
    results = {}
    for name in VARIANTS:
        chunk = {"trl_chunked": 256, "ours": 7}.get(name)  # several chunks, none dividing the size
        fn = load_variant(name, chunk, args.trl_outputs)
        inputs = make_inputs(batch, seq, dim, vocab, torch.float32, args.device, seed=1)
        hidden, weight, targets, mask, grad_out = inputs
        results[name] = forward_backward(fn, hidden, weight, targets, mask, grad_out, batch)
    reference = results["naive"]
    report = {}
    for name in VARIANTS:
        logps, grad_hidden, grad_weight = results[name]
        errors = (
            (logps - reference[0]).abs().max().item(),
            ((grad_hidden - reference[1]).abs().max() / reference[1].abs().max()).item(),
            ((grad_weight - reference[2]).abs().max() / reference[2].abs().max()).item(),
        )
        report[name] = errors
        if not (logps[~mask] == 0).all() or max(errors) > CHECK_TOLERANCE:
            raise AssertionError(
                f"variant {name} disagrees with naive: log-prob error {errors[0]:.2e}, grad_hidden rel error "
                f"{errors[1]:.2e}, grad_weight rel error {errors[2]:.2e} (tolerance {CHECK_TOLERANCE:g})"
            )
    import cwpo  # load_variant("ours") put the repository root on sys.path

    chunk_default = inspect.signature(cwpo.token_logps).parameters["chunk_size"].default
    print(json.dumps({"check": report, "ours_default_chunk_size": chunk_default}))


def set_large_block_mmap(enabled):
    """glibc: serve every block >= 1 MiB by its own mmap (unmapped when freed, so RSS follows the live bytes) or
    never mmap (the pinned timing setting, MALLOC_MMAP_MAX_=0). False where mallopt is not available."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD, M_MMAP_MAX = -3, -4  # glibc's malloc.h
    if not enabled:
        return mallopt(M_MMAP_MAX, 0) == 1
    return mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1 and mallopt(M_MMAP_MAX, 1 << 20) == 1


def run_measure(args):
    """Peak extra memory (one pass) and time (median of the repeats) of one variant at one V; one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    fn = load_variant(args.variant, args.chunk_size, args.trl_outputs)
    # Memory is measured first, on a heap that holds nothing large. Under the timing setting (no mmap, no trim)
    # the heap fragments and its high-water mark drifts up from pass to pass by up to a logits-sized block. So
    # until the memory pass is over, glibc serves each block >= 1 MiB by its own mmap (it mmaps only what its
    # heap cannot serve, hence before any full-size pass): VmHWM then rises by the peak of the bytes held.
    mmap_for_memory = not on_cuda and set_large_block_mmap(True)
    forward_backward(fn, *make_inputs(2, 8, 16, 64, dtype, device, seed=2)[:4], torch.randn(16, device=device), 2)
    batch, seq, vocab = args.batch, args.tokens // args.batch, args.vocab[0]
    hidden, weight, targets, mask, grad_out = make_inputs(batch, seq, args.dim, vocab, dtype, device)
    element = torch.finfo(dtype).bits // 8
    grad_bytes = (hidden.numel() + weight.numel()) * element  # the two gradients every variant returns

    def one_pass():
        """Seconds and minor page faults of one forward + backward."""
        if on_cuda:
            torch.cuda.synchronize()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        out = forward_backward(fn, hidden, weight, targets, mask, grad_out, batch)
        if on_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        del out
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, hwm_reset = torch.cuda.memory_allocated(), True
    else:
        hwm_reset = reset_peak_rss()
        baseline = read_status_kb("VmRSS") if hwm_reset else read_status_kb("VmHWM")
    one_pass()
    peak = torch.cuda.max_memory_allocated() if on_cuda else read_status_kb("VmHWM")
    if mmap_for_memory:
        set_large_block_mmap(False)  # back to the pinned timing setting

    one_pass()  # warm-up: the heap grows to the variant's working set
    timed = [one_pass() for _ in range(args.repeats)]
    times = [seconds for seconds, _ in timed]
    result = {
        "vocab": vocab,
        "variant": args.variant,
        "time_s": statistics.median(times),
        "times_s": times,
        "extra_bytes": peak - baseline - grad_bytes,
        "peak_above_baseline_bytes": peak - baseline,
        "grad_bytes": grad_bytes,
        "scored_positions": int(mask.sum()),
        "minor_page_faults_per_timed_pass": statistics.mean(faults for _, faults in timed),
        "hwm_reset": hwm_reset,
        "mmap_for_memory": mmap_for_memory,
    }
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------------
# Parent process: spawn the children, print and save the table


def spawn(args, extra_argv):
    """Run this script as a child with the pinned environment; returns its stdout (raises with its stderr)."""
    env = {**os.environ, **child_env(args.threads)}
    argv = [sys.executable, os.path.abspath(__file__), *extra_argv]
    argv += ["--threads", str(args.threads), "--device", args.device, "--trl-outputs", ",".join(args.trl_outputs)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra_argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def print_header(args):
    env = child_env(args.threads)
    print("Log-prob kernel benchmark: forward + backward of per-token log-probs through the LM head")
    print(f"  shapes: N = {args.batch} x {args.tokens // args.batch} = {args.tokens} positions, "
          f"{args.tokens // 2} of them completion tokens; d = {args.dim}; V in {args.vocab}; dtype {args.dtype}")
    print(f"  naive, trl_selective: full logits over all {args.tokens} positions, masked afterwards (as a trainer "
          f"asking the model for logits); ours: only the {args.tokens // 2} completion positions")
    print(f"  trl_chunked: as DPOTrainer's fused head: all positions on a device without Triton (CPU), only the "
          f"completion positions with Triton; TRL's chunk size (_CHUNKED_LOGPROB_CHUNK_SIZE); extra outputs "
          f"{args.trl_outputs or 'none (log-probs only)'}")
    print(f"  device {args.device}; torch threads {args.threads}; child env: "
          + " ".join(f"{k}={v}" for k, v in env.items()))
    print(f"  time: median of {args.repeats} timed passes after a memory pass and a warm-up pass; each (V, variant) "
          f"in a fresh process")
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"  extra memory = {memory} above the inputs, minus the two returned gradients (hidden, weight) by size;"
          f" measured in its own pass" + ("" if args.device.startswith("cuda") else
          " with glibc switched to one mmap per block >= 1 MiB (RSS = bytes held; no heap fragmentation)"))
    print(f"  host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def format_table(rows):
    naive = {r["vocab"]: r for r in rows if r["variant"] == "naive"}
    lines = [f"{'V':>7} | {'variant':<13} | {'time (s)':>8} | {'time / naive':>12} | "
             f"{'extra memory (MB)':>17} | {'memory / naive':>14}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        base = naive.get(r["vocab"])
        t_ratio = f"{r['time_s'] / base['time_s']:.2f}" if base else "-"
        m_ratio = f"{r['extra_bytes'] / base['extra_bytes']:.3f}" if base and base["extra_bytes"] > 0 else "-"
        lines.append(f"{r['vocab']:>7} | {r['variant']:<13} | {r['time_s']:>8.3f} | {t_ratio:>12} | "
                     f"{r['extra_bytes'] / 1e6:>17.1f} | {m_ratio:>14}")
    return "\n".join(lines)


def goal_lines(rows, vocab=151936):
    """The issue's goal at V = 151,936: ours <= 1/8 naive extra memory, <= TRL chunked's, time <= 1.25 x naive."""
    by_name = {r["variant"]: r for r in rows if r["vocab"] == vocab}
    if not {"naive", "trl_chunked", "ours"} <= by_name.keys():
        return [f"goal check skipped: V = {vocab} not in this run"]
    naive, trl, ours = by_name["naive"], by_name["trl_chunked"], by_name["ours"]
    checks = [
        ("extra memory <= 1/8 naive", ours["extra_bytes"], naive["extra_bytes"] / 8, "MB"),
        ("extra memory <= TRL chunked", ours["extra_bytes"], trl["extra_bytes"], "MB"),
        ("time <= 1.25 x naive", ours["time_s"], 1.25 * naive["time_s"], "s"),
    ]
    lines = []
    for label, value, limit, unit in checks:
        scale = 1e6 if unit == "MB" else 1.0
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"goal at V={vocab}: ours {label}: {value / scale:.3f} {unit} vs limit "
                     f"{limit / scale:.3f} {unit} -> {verdict}")
    return lines


def write_json_atomic(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(args):
    print_header(args)
    check = spawn(args, ["--_check"])
    check = json.loads(check.strip().splitlines()[-1])
    errors = check["check"]
    print(f"  ours: cwpo.token_logps over the completion positions, chunk_size "
          f"{args.chunk_size or check['ours_default_chunk_size']}")
    print(f"  correctness (fp32, N=111, d=48, V=1003, vs naive; tolerance {CHECK_TOLERANCE:g}): "
          + ", ".join(f"{k} {max(v):.1e}" for k, v in errors.items()))
    rows = []
    for vocab in args.vocab:
        for variant in VARIANTS:
            argv = ["--_measure", variant, "--vocab", str(vocab), "--tokens", str(args.tokens), "--batch",
                    str(args.batch), "--dim", str(args.dim), "--repeats", str(args.repeats), "--dtype", args.dtype]
            if args.chunk_size is not None and variant == "ours":
                argv += ["--chunk-size", str(args.chunk_size)]
            out = spawn(args, argv)
            result = json.loads(next(l for l in out.splitlines()[::-1] if l.startswith("RESULT "))[7:])
            if not result["hwm_reset"]:
                print("  note: /proc/self/clear_refs not writable; baseline is VmHWM after the inputs")
            faults = result["minor_page_faults_per_timed_pass"]
            print(f"  ... V={vocab} {variant}: {result['time_s']:.3f} s, {result['extra_bytes'] / 1e6:.1f} MB, "
                  f"{faults:.0f} minor page faults per timed pass", file=sys.stderr, flush=True)
            rows.append(result)
    print()
    print(format_table(rows))
    print()
    for line in goal_lines(rows):
        print(line)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        settings["ours_chunk_size"] = args.chunk_size or check["ours_default_chunk_size"]
        write_json_atomic(args.json, {"settings": settings, "env": child_env(args.threads), "check": errors,
                                      "rows": rows, "goals": goal_lines(rows)})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 151936])
    p.add_argument("--tokens", type=int, default=4 * 512, help="N = batch x seq positions (half are completion)")
    p.add_argument("--batch", type=int, default=4, help="rows the N positions are split into")
    p.add_argument("--dim", type=int, default=896)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and OMP/MKL_NUM_THREADS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=None, help="ours' chunk_size (default: cwpo's default)")
    p.add_argument("--trl-outputs", default="", help="extra outputs for TRL's chunked kernel: '' (log-probs "
                   "only, its cheapest), 'dpo' (what DPOTrainer asks of the policy) or a comma list")
    p.add_argument("--json", default=None, help="also write the table here (atomically)")
    p.add_argument("--_check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_measure", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_outputs == "dpo":
        args.trl_outputs = TRL_DPO_POLICY_OUTPUTS
    else:
        args.trl_outputs = tuple(x for x in args.trl_outputs.split(",") if x)
    if args.tokens % args.batch or (args.tokens // args.batch) < 2:
        p.error(f"--tokens {args.tokens} must be a multiple of --batch {args.batch} with at least 2 per row")
    if args.variant is not None and args.variant not in VARIANTS:
        p.error(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args._check:
        run_check(args)
    elif args.variant is not None:
        run_measure(args)
    else:
        main(args)
