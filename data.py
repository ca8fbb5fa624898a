"""Data for CW-PO: the labeled / unlabeled / held-out split, the one tokenization path (chat
templates too) and the one batch layout (collate). formats.py reads the files; world.py is the
built-in world.
"""
import jinja2
import numpy as np
import torch

from formats import compile_template

# ----------------------------------------------------------------------------------- The split

def split_pairs(pairs, labeled_fraction, eval_size, seed):
    """Split pairs into (labeled, unlabeled, heldout): disjoint, covering all, each in file order.

    eval_size is a count (int) or a fraction of all pairs (float). One seeded permutation decides
    everything: its first eval_size entries are held out and the labeled set is the first
    labeled_fraction of the rest, so for one seed the 20 % labeled set lies inside the 30 % one and
    label fractions compare fairly.
    """
    n = len(pairs)
    n_eval = round(eval_size * n) if isinstance(eval_size, float) else int(eval_size)
    if not (0.0 <= labeled_fraction <= 1.0 and 0 <= n_eval <= n):
        raise ValueError(f"bad split of {n} pairs: labeled_fraction={labeled_fraction}, eval_size={eval_size}")

    order = np.random.default_rng(seed).permutation(n).tolist()
    n_labeled = round(labeled_fraction * (n - n_eval))
    labeled = order[n_eval:n_eval + n_labeled]
    unlabeled = order[n_eval + n_labeled:]
    heldout = order[:n_eval]
    return tuple([pairs[i] for i in sorted(part)] for part in (labeled, unlabeled, heldout))

# ----------------------------------------------------------------------------------- Chat templates

def prompt_of(tok, pair):
    """A pair's prompt as the encode functions take it: its chat messages where the data is
    conversational and tok has a chat template (TRL decides by the data's form), else its text."""
    chat = getattr(tok, "chat_template", None)  # None too for a tokenizer built in code (world.py)
    return pair["messages"] if chat and "messages" in pair else pair["prompt"]

def render(tok, messages, generation_prompt):
    """The ids of a chat as apply_chat_template(messages, add_generation_prompt=...) gives them: the
    template writes the special tokens (bos_token, eos_token are its variables), none are added."""
    ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id}
    special = {name: tok.id_to_token(i) for name, i in ids.items() if i is not None}
    try:
        template = compile_template(tok.chat_template)
        text = template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ValueError(f"{tok.template_file}: the chat template fails to render ({e})") from None
    return tok.encode(text, add_special_tokens=False).ids

# ----------------------------------------------------------------------------------- Tokenization

def encode_prompt(tok, prompt, max_len):
    """Prompt ids: text with the tokenizer's special tokens (BOS), a chat (a list of messages) as
    its template renders it with the generation prompt (TRL). Truncated from the LEFT so the end of
    the prompt, next to the answer, survives; a leading BOS is kept when truncating."""
    ids = render(tok, prompt, True) if isinstance(prompt, list) else tok.encode(prompt).ids
    if len(ids) <= max_len:
        return ids
    bos = ids[:1] if ids[0] == tok.bos_id and max_len > 1 else []
    return bos + ids[len(ids) - max_len + len(bos):]

def encode_answer(tok, answer, max_len, prompt=None):
    """Answer ids, truncated from the RIGHT (a truncated answer loses its end). After a chat prompt:
    the assistant turn and its end-of-turn token, the rendered prompt + answer past the rendered
    prompt (TRL), which must start it; after text: the answer, no special tokens, plus EOS."""
    if isinstance(prompt, list):
        head = render(tok, prompt, True)
        ids = render(tok, prompt + [{"role": "assistant", "content": answer}], False)
        if ids[:len(head)] != head:
            raise ValueError(f"{tok.template_file}: the chat template's rendering of prompt + "
                             "answer does not start with its rendering of the prompt")
        return ids[len(head):max_len + len(head)]
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no EOS token (tok.eos_id is None)")
    ids = tok.encode(answer, add_special_tokens=False).ids + [tok.eos_id]
    return ids[:max_len]

def encode_prompt_answer(tok, prompt, answer, max_prompt_len, max_answer_len):
    """One sequence (SFT, reward scoring): {"prompt_ids", "answer_ids"}."""
    return {"prompt_ids": encode_prompt(tok, prompt, max_prompt_len),
            "answer_ids": encode_answer(tok, answer, max_answer_len, prompt)}

def encode_pair(tok, prompt, chosen, rejected, max_prompt_len, max_answer_len):
    """One preference pair: {"prompt_ids", "chosen_ids", "rejected_ids"}."""
    return {"prompt_ids": encode_prompt(tok, prompt, max_prompt_len),
            "chosen_ids": encode_answer(tok, chosen, max_answer_len, prompt),
            "rejected_ids": encode_answer(tok, rejected, max_answer_len, prompt)}

# ----------------------------------------------------------------------------------- The batch layout

def collate(examples):
    """Batch encoded examples in the one layout every script uses: one row, no padding, each prompt
    computed once and followed by its answer(s). The row of pair 0 (prompt p0, chosen c0, rejected
    r0) and pair 1:

        input_ids     p0 p0 p0 c0 c0 r0 r0 r0 | p1 p1 c1 c1 c1 r1
        position_ids   0  1  2  3  4  3  4  5 |  0  1  2  3  4  2    each answer continues its prompt
        segment_ids    0  0  0  0  0  0  0  0 |  1  1  1  1  1  1    the example
        branch_ids     0  0  0  1  1  2  2  2 |  0  0  1  1  1  2    0 prompt, 1 chosen, 2 rejected

    A token attends to the earlier tokens of its own example that lie in the prompt or in its own
    branch (model.visible): the rejected answer never sees the chosen one, and each answer's
    log-probs are those of prompt + answer alone. The first token of each answer is predicted from
    the prompt's last position, so the tokens to score are listed explicitly, grouped by answer in
    order (answer a = pair i's chosen i, its rejected B + i; for single sequences, answer i):
      score_index  [N] long  index in the row of the hidden state that predicts the token
      score_target [N] long  the token id
      score_answer [N] long  its answer
      last_index   [A] long  index of each answer's last token (the reward model reads it)
    With input_ids, position_ids, segment_ids, branch_ids [1, T] long and weight [B] float: each
    example's "weight", else 1; ref_chosen_logps, ref_rejected_logps [B] float when the examples
    carry them. An answer's first token has no predictor, and is not scored, after an empty prompt.
    """
    keys = ("chosen_ids", "rejected_ids") if "chosen_ids" in examples[0] else ("answer_ids",)
    row = {name: [] for name in ("input_ids", "position_ids", "segment_ids", "branch_ids")}
    scored = [[] for _ in range(len(keys) * len(examples))]  # per answer: (index, target) pairs
    last_index = [0] * len(scored)

    for i, example in enumerate(examples):
        prompt = example["prompt_ids"]
        prompt_at = len(row["input_ids"])
        put(row, prompt, first_position=0, segment=i, branch=0)

        for b, key in enumerate(keys):
            answer = example[key]
            a = b * len(examples) + i
            answer_at = len(row["input_ids"])
            put(row, answer, first_position=len(prompt), segment=i, branch=b + 1)

            def index_of(t):  # position t of prompt + answer -> its index in the row
                return prompt_at + t if t < len(prompt) else answer_at + t - len(prompt)

            # position t of prompt + answer predicts token t + 1
            scored[a] = [(index_of(len(prompt) + j - 1), token)
                         for j, token in enumerate(answer) if len(prompt) + j > 0]
            last_index[a] = index_of(len(prompt) + len(answer) - 1)

    flat = [(index, target, a) for a, tokens in enumerate(scored) for index, target in tokens]
    score_index, score_target, score_answer = zip(*flat) if flat else ((), (), ())
    weights = [example.get("weight", 1.0) for example in examples]
    references = {key: torch.tensor([example[key] for example in examples])
                  for key in ("ref_chosen_logps", "ref_rejected_logps") if key in examples[0]}
    return {**{name: torch.tensor([values]) for name, values in row.items()}, **references,
            "score_index": torch.tensor(score_index, dtype=torch.long),
            "score_target": torch.tensor(score_target, dtype=torch.long),
            "score_answer": torch.tensor(score_answer, dtype=torch.long),
            "last_index": torch.tensor(last_index),
            "weight": torch.tensor(weights, dtype=torch.float32)}

def put(row, ids, first_position, segment, branch):
    """Append ids to the packed row with their positions, example and branch (collate)."""
    row["input_ids"] += ids
    row["position_ids"] += range(first_position, first_position + len(ids))
    row["segment_ids"] += [segment] * len(ids)
    row["branch_ids"] += [branch] * len(ids)

def iterate_batches(examples, batch_size, seed=None):
    """Yield lists of batch_size examples (the last one may be shorter); shuffled by `seed` when
    given."""
    n = len(examples)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    for start in range(0, n, batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]
