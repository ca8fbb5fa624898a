"""Tests for data.py: loaders on hand-written fixtures, the split, tokenization and batch layout (a tokenizer
trained on world.py's text). Expected values are written out by hand or computed by naive
formulas here, never taken from data.py's own output."""
import gzip
import json
import sys

import pytest
import torch

import data

HH_CHOSEN = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?"
             "\n\nAssistant: Mix flour, water and yeast, then bake it.")
HH_REJECTED = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?"
               "\n\nAssistant: I'm sorry, I can't help with that.")
HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant:"


def write_lines(path, lines):
    """Write raw text lines (records already serialized, or deliberately broken) to .jsonl or .jsonl.gz."""
    text = "".join(line + "\n" for line in lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_records(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("name", ["hh.jsonl", "hh.jsonl.gz"])
def test_hh_prompt_and_answers_are_split_at_the_last_assistant_turn(tmp_path, name):
    path = write_records(tmp_path / name, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    expected = [{"prompt": HH_PROMPT, "chosen": " Mix flour, water and yeast, then bake it.",
                 "rejected": " I'm sorry, I can't help with that."}]
    assert data.load_pairs(path) == expected
    assert data.load_pairs(path, fmt="hh") == expected


def test_hh_transcripts_that_differ_before_the_last_turn_share_one_prompt(tmp_path):
    # Like a few real records: the chosen transcript has one turn more than the rejected one.
    chosen = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: A2"
    rejected = "\n\nHuman: Q1\n\nAssistant: B1"
    path = write_records(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    assert data.load_pairs(path) == [{"prompt": "\n\nHuman: Q1\n\nAssistant:",
                                      "chosen": " A1\n\nHuman: Q2\n\nAssistant: A2", "rejected": " B1"}]


def test_tldr_comparison(tmp_path):
    record = {"info": {"id": "t3", "post": "I burnt my rice again.", "title": "Rice help", "subreddit": "cooking"},
              "summaries": [{"text": " Burnt rice.", "policy": "a"}, {"text": "I keep burning rice, how to stop? ",
                                                                        "policy": "b"}],
              "choice": 1, "worker": "w1"}
    path = write_records(tmp_path / "tldr.jsonl.gz", [record])
    expected = [{"prompt": "SUBREDDIT: r/cooking\nTITLE: Rice help\nPOST: I burnt my rice again.\nTL;DR:",
                 "chosen": " I keep burning rice, how to stop?", "rejected": " Burnt rice."}]
    assert data.load_pairs(path) == expected
    assert data.load_pairs(path, fmt="tldr") == expected


def test_ultrafeedback_chat_lists_strings_and_a_missing_prompt(tmp_path):
    def chat(user, answer):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    records = [
        {"prompt": "What is 2+2?", "prompt_id": "x", "chosen": chat("What is 2+2?", "4"),
         "rejected": chat("What is 2+2?", "5"), "score_chosen": 9.0, "score_rejected": 2},
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": [{"role": "assistant", "content": "Seven."}]},
        {"chosen": chat("Say hi.", "Hi!"), "rejected": chat("Say hi.", "No.")},
    ]
    path = write_records(tmp_path / "ufb.jsonl", records)
    expected = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2},
                {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
                {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    assert data.load_pairs(path) == expected
    assert data.load_pairs(path, fmt="ufb") == expected


def test_ultrafeedback_binarized_parquet_as_published(tmp_path, monkeypatch):
    # the paper's UltraFeedback is published as parquet only; its columns and chat-message lists, as HF has them
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    chat = lambda user, answer: [{"content": user, "role": "user"}, {"content": answer, "role": "assistant"}]  # noqa
    rows = [{"prompt": q, "prompt_id": f"id{i}", "chosen": chat(q, good), "rejected": chat(q, bad),
             "messages": chat(q, good), "score_chosen": 8.5 - i, "score_rejected": 2.0}
            for i, (q, good, bad) in enumerate([("What is 2+2?", "4", "5"), ("Name a color.", "Blue.", "Seven.")])]
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert data.load_pairs(path) == [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score_chosen": 8.5, "score_rejected": 2.0},
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven.", "score_chosen": 7.5, "score_rejected": 2.0}]
    assert data.load_pairs(str(path), fmt="ufb") == data.load_pairs(path)
    bad = rows + [dict(rows[0], rejected=rows[0]["rejected"][:1])]  # ends in the user's message
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet, row 3: key 'rejected'"):
        data.load_pairs(tmp_path / "bad.parquet")
    (tmp_path / "cut.parquet").write_bytes(path.read_bytes()[:200])  # a download cut short
    with pytest.raises(ValueError, match="cut.parquet: not a readable parquet file"):
        data.load_pairs(tmp_path / "cut.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed: the import fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="parquet needs the package pyarrow"):
        data.load_pairs(path)


def test_plain_pairs_keep_numbers_and_unlabeled_pairs(tmp_path):
    pairs = write_records(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "confidence": 0.4,
                                                   "note": "dropped"}])
    assert data.load_pairs(pairs) == [{"prompt": "p", "chosen": "c", "rejected": "r", "confidence": 0.4}]
    assert data.load_pairs(pairs, fmt="pairs") == data.load_pairs(pairs)
    unlabeled = write_records(tmp_path / "u.jsonl.gz", [{"prompt": "p", "answer_a": "a", "answer_b": "b"}])
    assert data.load_pairs(unlabeled) == [{"prompt": "p", "answer_a": "a", "answer_b": "b"}]
    assert data.load_pairs(unlabeled, fmt="unlabeled") == data.load_pairs(unlabeled)


GOOD_HH = json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})


@pytest.mark.parametrize("bad_line, key", [
    ('{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", "rejected": ', "Expecting value"),  # bad JSON
    (json.dumps({"chosen": HH_CHOSEN}), "'rejected'"),                                    # missing key
    (json.dumps({"chosen": HH_CHOSEN, "rejected": 7}), "'rejected'"),                     # wrong type
    (json.dumps({"chosen": "\n\nHuman: no assistant turn", "rejected": HH_REJECTED}), "'chosen'"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_record_error_names_file_line_and_key(tmp_path, bad_line, key):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_HH, "", bad_line, GOOD_HH])  # line 2 is blank
    with pytest.raises(ValueError) as info:
        data.load_pairs(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and key in message


@pytest.mark.parametrize("fmt, record, key", [
    ("tldr", {"info": {"post": "p", "title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0},
     "info.subreddit"),
    ("tldr", {"info": {"post": "p", "title": "t", "subreddit": "s"}, "summaries": [{"text": "a"}], "choice": 0},
     "summaries"),
    ("ufb", {"prompt": "p", "chosen": [{"role": "user", "content": "p"}], "rejected": "r"}, "'chosen'"),
    ("unlabeled", {"prompt": "p", "answer_a": "a"}, "'answer_b'"),
])
def test_malformed_records_of_other_formats(tmp_path, fmt, record, key):
    path = write_records(tmp_path / "bad.jsonl.gz", [record])
    with pytest.raises(ValueError, match="line 1") as info:
        data.load_pairs(path, fmt=fmt)
    assert key in str(info.value) and str(path) in str(info.value)


def test_skip_bad_skips_and_reports_how_many(tmp_path, capsys):
    path = write_lines(tmp_path / "mixed.jsonl.gz", [GOOD_HH, "{not json", GOOD_HH, '{"chosen": "x"}', GOOD_HH])
    pairs = data.load_pairs(path, skip_bad=True)
    assert len(pairs) == 3 and all(p["prompt"] == HH_PROMPT for p in pairs)
    err = capsys.readouterr().err
    assert "skipped 2" in err and str(path) in err and "line 2" in err


def test_empty_files_and_unknown_formats_are_clear_errors(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    blank = write_lines(tmp_path / "blank.jsonl.gz", ["", "  "])
    all_bad = write_lines(tmp_path / "all_bad.jsonl", ["{oops"])
    for path in (empty, blank, all_bad):
        with pytest.raises(ValueError, match="no records") as info:
            data.load_pairs(path, skip_bad=True)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="no records"):
        data.load_pairs(empty)
    odd = write_records(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="line 1.*cannot tell the format"):
        data.load_pairs(odd)
    with pytest.raises(ValueError, match="unknown format"):
        data.load_pairs(odd, fmt="csv")


def test_corrupt_gzip_confidence_and_record_kind_errors(tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl.gz", [GOOD_HH] * 50)
    raw = open(good, "rb").read()
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[:len(raw) // 2])  # bug: gzip's EOFError escapes, unnamed
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all\n")  # bug: BadGzipFile escapes, unnamed
    for name in ("cut.jsonl.gz", "fake.jsonl.gz"):
        for skip_bad in (False, True):
            with pytest.raises(ValueError, match=f"{name}: unreadable"):
                data.load_pairs(tmp_path / name, skip_bad=skip_bad)
    # bug: a confidence that is a string, NaN or out of range is dropped, then reported as missing (or trained on)
    for bad in ('"0.7"', "NaN", "1.5", "-0.1"):
        path = write_lines(tmp_path / "c.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": %s}' % bad])
        with pytest.raises(ValueError, match="line 1: key 'confidence' must be a number in"):
            data.load_pairs(path)
    # bug: a pairs record without its prompt is read as HH and blamed on a missing "Assistant:" alone
    path = write_records(tmp_path / "noprompt.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="needs the key 'prompt'"):
        data.load_pairs(path)
    # bug: pairs whose two answers are equal train silently at a constant loss
    same = write_records(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"},
                                                   {"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert len(data.load_pairs(same)) == 2
    assert "1 pair(s)" in capsys.readouterr().err


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


# --- issue 24

def test_a_pair_whose_two_chat_histories_disagree_is_refused(tmp_path):
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    records = [{"chosen": [user("hi"), bot("hello")], "rejected": [user("hi"), bot("go away")]},
               {"chosen": [user("hi"), bot("hello")], "rejected": [user("bye"), bot("go away")]}]
    path = write_records(tmp_path / "ufb.jsonl", records)
    with pytest.raises(ValueError, match="line 2: keys 'chosen' and 'rejected' hold different chat histories"):
        data.load_pairs(path)  # bug: one pair with the chosen history's prompt
    assert data.load_pairs(write_records(tmp_path / "ok.jsonl", records[:1]))[0]["prompt"] == "hi"


def test_training_data_must_be_labeled(tmp_path):
    path = write_records(tmp_path / "u.jsonl", [{"prompt": "p", "answer_a": "a", "answer_b": "b"}])
    for fmt in ("auto", "unlabeled"):  # bug: train_policy.py said only "error: chosen"
        with pytest.raises(ValueError, match="u.jsonl, line 1: an unlabeled pair"):
            data.load_pairs(path, fmt, labeled=True)
    assert data.load_pairs(path)[0]["answer_a"] == "a"  # where a prompt is all that is read
