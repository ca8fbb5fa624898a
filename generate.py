"""Generation for GRA: batched sampling with a preallocated KV cache, gpt-fast style, for model.py's
decoder. Beside the method: eval.py's answers come from here.

    answers = generate_answers(load_model("runs/cw-dpo"), tok, prompt_ids, max_new_tokens=128)
"""
import torch
import torch.nn.functional as F

def sample_next(logits, temperature, top_p, generator):
    """The next token of each row from logits [B, V]: greedy when temperature is 0, else
    temperature / top-p (nucleus) sampling with `generator` -> [B] long."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, top_p=1.0, generator=None):
    """Batched generation with a preallocated KV cache (gpt-fast style). prompts: token-id lists,
    left-padded here into one batch. Greedy when temperature is 0, else sampled (sample_next).
    A row stops at eos_id. Returns the new tokens of each row, the EOS excluded."""
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    B, P = len(prompts), max(len(p) for p in prompts)

    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # [B, P], left-padded
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):P] = 1
    shape = (B, cfg.n_kv_head, P + max_new_tokens, cfg.head_dim)
    cache = [(torch.zeros(shape, dtype=param.dtype, device=device),
              torch.zeros(shape, dtype=param.dtype, device=device)) for _ in range(cfg.n_layer)]
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    # the prompt: project only the last position ([B, P, V] logits at a 150k vocabulary would not fit)
    hidden = model(ids, mask[:, :P], return_hidden=True, cache=cache, start=0)  # [B, P, d']
    logits = model.lm_head(hidden[:, -1])  # [B, V]

    for t in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        out[:, t] = token
        done |= token == eos_id
        if done.all():
            break
        mask[:, P + t] = 1
        logits = model(token[:, None], mask[:, :P + t + 1], cache=cache, start=P + t)[:, -1]

    return [row[:row.index(eos_id)] if eos_id in row else row[:t + 1] for row in out.tolist()]

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
