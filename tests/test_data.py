"""Tests for data.py: the split, tokenization and batch layout (a tokenizer trained on world.py's
text). Expected values are written out by hand or computed by naive formulas here, never taken
from data.py's own output."""
import pytest
import torch

import data

# ----------------------------------------------------------------------------- split

def test_split_is_seeded_disjoint_covering_and_nested():
    pairs = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(1000)]
    ids = lambda part: [p["prompt"] for p in part]  # noqa: E731
    lab20, unl20, held20 = data.split_pairs(pairs, 0.2, 100, seed=3)
    lab30, unl30, held30 = data.split_pairs(pairs, 0.3, 100, seed=3)
    assert (len(lab20), len(unl20), len(held20)) == (180, 720, 100)
    assert (len(lab30), len(unl30), len(held30)) == (270, 630, 100)
    for lab, unl, held in ((lab20, unl20, held20), (lab30, unl30, held30)):
        sets = set(ids(lab)), set(ids(unl)), set(ids(held))
        assert sets[0] | sets[1] | sets[2] == set(ids(pairs)) and sum(map(len, sets)) == len(pairs)
        assert ids(lab) == sorted(ids(lab), key=lambda s: int(s[1:]))  # file order kept
    assert set(ids(lab20)) < set(ids(lab30)) and ids(held20) == ids(held30)
    assert data.split_pairs(pairs, 0.2, 100, seed=3) == (lab20, unl20, held20)
    assert ids(data.split_pairs(pairs, 0.2, 100, seed=4)[0]) != ids(lab20)
    lab, unl, held = data.split_pairs(pairs, 0.5, 0.1, seed=0)  # float eval size: a fraction of all pairs
    assert (len(lab), len(unl), len(held)) == (450, 450, 100)
    for bad in ((1.5, 10), (0.2, 1001), (0.2, -1), (0.2, 1.5)):
        with pytest.raises(ValueError, match="bad split"):
            data.split_pairs(pairs, *bad, seed=0)


# ----------------------------------------------------------------------------- tokenizer, encoding, batches

def test_encode_truncates_prompt_from_the_left_and_answer_from_the_right(tok):
    prompt = "\n\nHuman: I want a snack for tonight. I like sweet food. I have 5 dollars.\n\nAssistant:"
    answer = " Sure! Try the ice pops. It is sweet and cold. It costs 1 dollars. Enjoy!"
    full_prompt = tok.encode(prompt).ids
    full_answer = tok.encode(answer, add_special_tokens=False).ids
    ex = data.encode_pair(tok, prompt, answer, " No.", max_prompt_len=100, max_answer_len=100)
    assert ex["prompt_ids"] == full_prompt and full_prompt[0] == tok.bos_id
    assert ex["chosen_ids"] == full_answer + [tok.eos_id]
    assert ex["rejected_ids"] == tok.encode(" No.", add_special_tokens=False).ids + [tok.eos_id]
    short = data.encode_pair(tok, prompt, answer, " No.", max_prompt_len=8, max_answer_len=6)
    assert short["prompt_ids"] == [tok.bos_id] + full_prompt[-7:]  # the end of the prompt, BOS kept
    assert tok.decode(short["prompt_ids"]).endswith("\n\nAssistant:")
    assert short["chosen_ids"] == full_answer[:6]  # the start of the answer; the EOS is cut off
    assert short["rejected_ids"] == ex["rejected_ids"][:6]
    single = data.encode_prompt_answer(tok, prompt, answer, 8, 6)
    assert single == {"prompt_ids": short["prompt_ids"], "answer_ids": short["chosen_ids"]}


def test_collate_layout_prompt_once_answers_after_it(tok):
    pairs = [("\n\nHuman: Can you suggest a drink?\n\nAssistant:", " Try the lemonade.", " Whatever."),
             ("\n\nHuman: What dinner should I get? I like spicy food.\n\nAssistant:", " Try the chicken curry. "
              "It is spicy and creamy. Enjoy!", " I do not know what to get."),
             ("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Ugh, fine. Figure it out yourself.")]
    examples = [data.encode_pair(tok, p, c, r, 64, 64) for p, c, r in pairs]
    batch = data.collate(examples)
    B, (R, T) = len(pairs), batch["input_ids"].shape
    lengths = [len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples]
    assert R == 1 and T == sum(lengths)  # one row, no padding
    assert all(batch[k].dtype == torch.long for k in batch if k != "weight")
    assert batch["weight"].dtype == torch.float32 and torch.equal(batch["weight"], torch.ones(B))
    ids, segment, branch = (batch[k].flatten() for k in ("input_ids", "segment_ids", "branch_ids"))
    assert segment.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        part = lambda b: ids[(segment == i) & (branch == b)].tolist()  # noqa: E731
        assert tok.decode(part(0)) == prompt
        for b, answer in ((1, chosen), (2, rejected)):
            assert part(b)[-1] == tok.eos_id and tok.decode(part(b)[:-1], skip_special_tokens=False) == answer
            assert batch["score_target"][batch["score_answer"] == (b - 1) * B + i].tolist() == part(b)
    weighted = data.collate([dict(ex, weight=w) for ex, w in zip(examples, [0.5, 0.0, 1.0])])
    assert torch.equal(weighted["weight"], torch.tensor([0.5, 0.0, 1.0]))
    singles = data.collate([data.encode_prompt_answer(tok, p, c, 64, 64) for p, c, _ in pairs])
    for i, (prompt, chosen, _) in enumerate(pairs):  # single sequences: one answer each, answer i
        assert tok.decode(singles["score_target"][singles["score_answer"] == i].tolist()[:-1]) == chosen
    assert len(singles["last_index"]) == B and (singles["input_ids"].flatten()[singles["last_index"]] == tok.eos_id).all()


def test_iterate_batches():
    items = list(range(7))
    assert list(data.iterate_batches(items, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    shuffled = list(data.iterate_batches(items, 3, seed=1))
    assert [len(b) for b in shuffled] == [3, 3, 1] and sorted(sum(shuffled, [])) == items
    assert shuffled == list(data.iterate_batches(items, 3, seed=1))
    assert any(list(data.iterate_batches(items, 7, seed=s))[0] != items for s in range(5))
