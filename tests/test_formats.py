"""Tests for formats.py: every file format on hand-written fixtures, and its errors. Expected values are
written out by hand, never taken from formats.py's own output."""
import gzip
import json
import sys

import pytest

import formats

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
    assert formats.load_pairs(path) == expected
    assert formats.load_pairs(path, fmt="hh") == expected


def test_hh_transcripts_that_differ_before_the_last_turn_share_one_prompt(tmp_path):
    # Like a few real records: the chosen transcript has one turn more than the rejected one.
    chosen = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: A2"
    rejected = "\n\nHuman: Q1\n\nAssistant: B1"
    path = write_records(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    assert formats.load_pairs(path) == [{"prompt": "\n\nHuman: Q1\n\nAssistant:",
                                      "chosen": " A1\n\nHuman: Q2\n\nAssistant: A2", "rejected": " B1"}]


def test_tldr_comparison(tmp_path):
    record = {"info": {"id": "t3", "post": "I burnt my rice again.", "title": "Rice help", "subreddit": "cooking"},
              "summaries": [{"text": " Burnt rice.", "policy": "a"}, {"text": "I keep burning rice, how to stop? ",
                                                                        "policy": "b"}],
              "choice": 1, "worker": "w1"}
    path = write_records(tmp_path / "tldr.jsonl.gz", [record])
    expected = [{"prompt": "SUBREDDIT: r/cooking\nTITLE: Rice help\nPOST: I burnt my rice again.\nTL;DR:",
                 "chosen": " I keep burning rice, how to stop?", "rejected": " Burnt rice."}]
    assert formats.load_pairs(path) == expected
    assert formats.load_pairs(path, fmt="tldr") == expected


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
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731  the prompt's chat, kept for templates
    expected = [{"prompt": "What is 2+2?", "messages": user("What is 2+2?"), "chosen": "4", "rejected": "5",
                 "score_chosen": 9.0, "score_rejected": 2},
                {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
                {"prompt": "Say hi.", "messages": user("Say hi."), "chosen": "Hi!", "rejected": "No."}]
    assert formats.load_pairs(path) == expected
    assert formats.load_pairs(path, fmt="ufb") == expected


def test_conversational_prompts_trl_lists_cwpo_messages_and_hh_as_turns(tmp_path):
    """TRL's conversational preference records (the prompt a chat list), the records cwpo writes back (a text
    prompt and its "messages") and HH-RLHF read as turns (fmt "hh-chat") all carry the prompt's chat."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    trl = {"prompt": chat, "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    expected = {"prompt": "Be brief.\n\nHi", "messages": chat, "chosen": "Hello.", "rejected": "Go away."}
    assert formats.load_pairs(write_records(tmp_path / "trl.jsonl", [trl])) == [expected]
    assert formats.load_pairs(write_records(tmp_path / "ours.jsonl", [dict(expected, confidence=0.5)])) == [
        dict(expected, confidence=0.5)]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Go."}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye"}]
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
    path = write_records(tmp_path / "hh.jsonl", [hh])
    assert formats.load_pairs(path, "hh-chat") == [{"prompt": prompt, "messages": turns, "chosen": "Bye!",
                                                     "rejected": "Go."}]
    assert formats.load_pairs(path) == [{"prompt": prompt, "chosen": " Bye!", "rejected": " Go."}]
    with pytest.raises(ValueError, match="line 1: key 'prompt': a chat-message list needs string 'role'"):
        formats.load_pairs(write_records(tmp_path / "bad.jsonl", [dict(trl, prompt=[{"role": "user"}])]))


def test_ultrafeedback_binarized_parquet_as_published(tmp_path, monkeypatch):
    # the paper's UltraFeedback is published as parquet only; its columns and chat-message lists, as HF has them
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    chat = lambda user, answer: [{"content": user, "role": "user"}, {"content": answer, "role": "assistant"}]  # noqa
    rows = [{"prompt": q, "prompt_id": f"id{i}", "chosen": chat(q, good), "rejected": chat(q, bad),
             "messages": chat(q, good), "score_chosen": 8.5 - i, "score_rejected": 2.0}
            for i, (q, good, bad) in enumerate([("What is 2+2?", "4", "5"), ("Name a color.", "Blue.", "Seven.")])]
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    user = lambda text: [{"content": text, "role": "user"}]  # noqa: E731  not the "messages" column (prompt + answer)
    assert formats.load_pairs(path) == [
        {"prompt": "What is 2+2?", "messages": user("What is 2+2?"), "chosen": "4", "rejected": "5",
         "score_chosen": 8.5, "score_rejected": 2.0},
        {"prompt": "Name a color.", "messages": user("Name a color."), "chosen": "Blue.", "rejected": "Seven.",
         "score_chosen": 7.5, "score_rejected": 2.0}]
    assert formats.load_pairs(str(path), fmt="ufb") == formats.load_pairs(path)
    bad = rows + [dict(rows[0], rejected=rows[0]["rejected"][:1])]  # ends in the user's message
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet, row 3: key 'rejected'"):
        formats.load_pairs(tmp_path / "bad.parquet")
    (tmp_path / "cut.parquet").write_bytes(path.read_bytes()[:200])  # a download cut short
    with pytest.raises(ValueError, match="cut.parquet: not a readable parquet file"):
        formats.load_pairs(tmp_path / "cut.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed: the import fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="parquet needs the package pyarrow"):
        formats.load_pairs(path)


def test_plain_pairs_keep_numbers_and_unlabeled_pairs(tmp_path):
    pairs = write_records(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "confidence": 0.4,
                                                   "note": "dropped"}])
    assert formats.load_pairs(pairs) == [{"prompt": "p", "chosen": "c", "rejected": "r", "confidence": 0.4}]
    assert formats.load_pairs(pairs, fmt="pairs") == formats.load_pairs(pairs)
    unlabeled = write_records(tmp_path / "u.jsonl.gz", [{"prompt": "p", "answer_a": "a", "answer_b": "b"}])
    assert formats.load_pairs(unlabeled) == [{"prompt": "p", "answer_a": "a", "answer_b": "b"}]
    assert formats.load_pairs(unlabeled, fmt="unlabeled") == formats.load_pairs(unlabeled)


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
        formats.load_pairs(path)
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
        formats.load_pairs(path, fmt=fmt)
    assert key in str(info.value) and str(path) in str(info.value)


def test_skip_bad_skips_and_reports_how_many(tmp_path, capsys):
    path = write_lines(tmp_path / "mixed.jsonl.gz", [GOOD_HH, "{not json", GOOD_HH, '{"chosen": "x"}', GOOD_HH])
    pairs = formats.load_pairs(path, skip_bad=True)
    assert len(pairs) == 3 and all(p["prompt"] == HH_PROMPT for p in pairs)
    err = capsys.readouterr().err
    assert "skipped 2" in err and str(path) in err and "line 2" in err


def test_empty_files_and_unknown_formats_are_clear_errors(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    blank = write_lines(tmp_path / "blank.jsonl.gz", ["", "  "])
    all_bad = write_lines(tmp_path / "all_bad.jsonl", ["{oops"])
    for path in (empty, blank, all_bad):
        with pytest.raises(ValueError, match="no records") as info:
            formats.load_pairs(path, skip_bad=True)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="no records"):
        formats.load_pairs(empty)
    odd = write_records(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="line 1.*cannot tell the format"):
        formats.load_pairs(odd)
    with pytest.raises(ValueError, match="unknown format"):
        formats.load_pairs(odd, fmt="csv")


def test_corrupt_gzip_confidence_and_record_kind_errors(tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl.gz", [GOOD_HH] * 50)
    raw = open(good, "rb").read()
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[:len(raw) // 2])  # bug: gzip's EOFError escapes, unnamed
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all\n")  # bug: BadGzipFile escapes, unnamed
    for name in ("cut.jsonl.gz", "fake.jsonl.gz"):
        for skip_bad in (False, True):
            with pytest.raises(ValueError, match=f"{name}: unreadable"):
                formats.load_pairs(tmp_path / name, skip_bad=skip_bad)
    # bug: a confidence that is a string, NaN or out of range is dropped, then reported as missing (or trained on)
    for bad in ('"0.7"', "NaN", "1.5", "-0.1"):
        path = write_lines(tmp_path / "c.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": %s}' % bad])
        with pytest.raises(ValueError, match="line 1: key 'confidence' must be a number in"):
            formats.load_pairs(path)
    # bug: a pairs record without its prompt is read as HH and blamed on a missing "Assistant:" alone
    path = write_records(tmp_path / "noprompt.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="needs the key 'prompt'"):
        formats.load_pairs(path)
    # bug: pairs whose two answers are equal train silently at a constant loss
    same = write_records(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"},
                                                   {"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert len(formats.load_pairs(same)) == 2
    assert "1 pair(s)" in capsys.readouterr().err


def test_a_pair_whose_two_chat_histories_disagree_is_refused(tmp_path):
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    records = [{"chosen": [user("hi"), bot("hello")], "rejected": [user("hi"), bot("go away")]},
               {"chosen": [user("hi"), bot("hello")], "rejected": [user("bye"), bot("go away")]}]
    path = write_records(tmp_path / "ufb.jsonl", records)
    with pytest.raises(ValueError, match="line 2: keys 'chosen' and 'rejected' hold different chat histories"):
        formats.load_pairs(path)  # bug: one pair with the chosen history's prompt
    assert formats.load_pairs(write_records(tmp_path / "ok.jsonl", records[:1]))[0]["prompt"] == "hi"


def test_training_data_must_be_labeled(tmp_path):
    path = write_records(tmp_path / "u.jsonl", [{"prompt": "p", "answer_a": "a", "answer_b": "b"}])
    for fmt in ("auto", "unlabeled"):  # bug: train_policy.py said only "error: chosen"
        with pytest.raises(ValueError, match="u.jsonl, line 1: an unlabeled pair"):
            formats.load_pairs(path, fmt, labeled=True)
    assert formats.load_pairs(path)[0]["answer_a"] == "a"  # where a prompt is all that is read


# ----------------------------------------------------------------------------- tokenizers

def test_tokenizer_json_and_vocab_merges_fallback(tmp_path):
    """Our tokenizer reading against transformers' on a tokenizer.json folder, and a GPT-2 / OPT folder of
    vocab.json + merges.txt with add_bos_token."""
    import os
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from formats import load_tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the weak model speaks with confidence"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"]))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(tmp_path / "a"))
    ours = load_tokenizer(str(tmp_path / "a"))
    text = "the weak model speaks"
    assert ours.encode(text).ids == fast(text)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 1, 0)
    # a GPT-2/OPT style folder: vocab.json + merges.txt only
    os.makedirs(tmp_path / "b")
    tok.model.save(str(tmp_path / "b"))
    (tmp_path / "b" / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}))
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "</s>"}))
    gpt2_style = load_tokenizer(str(tmp_path / "b"))
    assert gpt2_style.encode(text).ids == [1] + tok.encode(text).ids
    assert gpt2_style.decode(tok.encode(text).ids) == text
