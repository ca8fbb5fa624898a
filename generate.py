"""Generation for GRA, at the speed of the model: batched sampling over a preallocated KV cache,
gpt-fast style, for model.py's decoder, with an optionally torch.compile'd decode step. Beside the
method: eval.py's answers come from here.

    answers = generate_answers(load_model("runs/cw-dpo"), tok, prompt_ids, max_new_tokens=128)
"""
import functools

import torch

@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, top_p=1.0, generator=None,
             compiled=False):
    """Batched generation over a preallocated KV cache (gpt-fast style). prompts: token-id lists. Greedy when
    temperature is 0, else temperature / top-p (nucleus) sampling with `generator`. A row stops at eos_id.
    Returns the new tokens of each row, the EOS excluded.

    The rows run sorted by prompt length (answers returned in the caller's order). Prefill runs them in groups
    of similar lengths, right-padded (at most PREFILL_PAD padded tokens per real one): each prompt's keys /
    values land at the start of its row of the cache [B, kv heads, longest prompt + max_new_tokens, hd], the
    group attends over its own width of the cache (not its whole length), and a causal mask keeps its pads
    out of its sight. Token t of row b then goes to position len(prompt b) + t (over the pads) and attends over
    its row, keys past its position masked out (decode_step). Eager, each step attends over the cache up to the
    longest row's position; compiled=True attends over the whole cache, so that one torch.compile'd graph
    (static shapes, gpt-fast's way) serves every step.
    """
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate: every prompt needs at least one token")

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[i] for i in order]
    cfg, weight = model.config, model.wte.weight
    B, length = len(prompts), max(map(len, prompts)) + max_new_tokens
    length = -(-length // 128) * 128 if compiled else length  # a few cache sizes: few recompiles
    shape = (B, cfg.n_kv_head, length, cfg.head_dim)
    cache = [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in range(cfg.n_layer)]

    last = []
    for a, b in prefill_groups([len(p) for p in prompts]):  # rows a .. b - 1, their own slice of the cache
        width = len(prompts[b - 1])
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts[a:b]], device=weight.device)  # [g, W]
        rows = [(k[a:b, :, :width], v[a:b, :, :width]) for k, v in cache]  # its width, not the cache's
        hidden = model(ids, cache=rows, start=0, return_hidden=True)  # [g, W, d]
        ends = torch.tensor([len(p) - 1 for p in prompts[a:b]], device=weight.device)
        last.append(hidden[torch.arange(b - a, device=weight.device), ends])  # [g, d] at each last prompt token
    logits = model.lm_head(torch.cat(last))  # [B, V]

    step = compiled_decode_step() if compiled else decode_step
    sorted_rows = torch.tensor(order, device=weight.device)  # caller's row of each sorted row
    restore = torch.argsort(sorted_rows)  # sorted row of each caller's row
    lengths = torch.tensor([len(p) for p in prompts], device=weight.device)  # [B]
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=weight.device)
    done = torch.zeros(B, dtype=torch.bool, device=weight.device)
    for t in range(max_new_tokens):
        drawn = next_token(logits.float()[restore], temperature, top_p, generator)  # draws in the caller's row order
        nxt = drawn[sorted_rows].masked_fill(done, pad_id)  # [B]
        out[:, t] = nxt
        done |= nxt == eos_id
        if done.all():
            break
        span = None if compiled else len(prompts[-1]) + t + 1  # eager: no key past the longest row's position
        logits = step(model, nxt, lengths + t, cache, span)

    answers = [row[:row.index(eos_id)] if eos_id in row else row[:t + 1] for row in out.tolist()]
    return [answers[order.index(i)] for i in range(B)]

PREFILL_PAD = 0.25  # padded tokens allowed per real token in a prefill group

def prefill_groups(lengths):
    """Sorted prompt lengths -> [(first row, end row)] groups whose right-padded size (rows x longest) stays
    within (1 + PREFILL_PAD) x their real tokens."""
    groups, first = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or (i + 1 - first) * lengths[i] > (1 + PREFILL_PAD) * sum(lengths[first:i + 1]):
            groups.append((first, i))
            first = i
    return groups

def next_token(logits, temperature, top_p, generator):
    """logits [B, V] fp32 -> [B] token ids: the argmax, or a draw from softmax(logits / temperature) cut to the
    smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

def decode_step(model, tokens, pos, cache, span=None):
    """One token a row through model.GPT: tokens [B] at positions pos [B] -> logits [B, V]. The
    model writes each row's keys / values at its position and attends over the row's first `span`
    keys of the cache (None: all), those past pos masked out."""
    length = span or cache[0][0].shape[2]
    view = [(k[:, :, :length], v[:, :, :length]) for k, v in cache]  # views: writes reach the cache
    return model(tokens[:, None], cache=view, start=pos[:, None])[:, 0]  # [B, V]

@functools.cache
def compiled_decode_step():
    """decode_step under torch.compile: static shapes, so one graph for every step of a generate call."""
    return torch.compile(decode_step, dynamic=False)

def generate_answers(model, tok, prompt_ids, max_new_tokens=64, temperature=0.0, seed=0, batch_size=256,
                     top_p=1.0):
    """Decoded answers of `model` to each prompt (token-id lists, e.g. data.encode_prompt's),
    greedy by default, else sampled at temperature / top_p."""
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        new = generate(model, prompt_ids[start:start + batch_size], max_new_tokens, tok.eos_id,
                       tok.pad_id, temperature, top_p, generator)
        answers += [tok.decode(a) for a in new]
    return answers
