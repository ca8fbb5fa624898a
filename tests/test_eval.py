"""eval.py: GRA (cwpo.win_rate) against the naive win-rate formula, and the GRA command against transformers."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cwpo
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")


def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    policy, sft = [3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0, 4.0]
    result = cwpo.win_rate(policy, sft)
    assert result["gra"] == pytest.approx(100 * (1 + 0.5 + 0 + 1 + 1) / 5)
    assert result["lo"] <= result["gra"] <= result["hi"]
    assert cwpo.win_rate(np.ones(50), np.ones(50))["gra"] == 50.0


def test_gra_command_against_transformers_generation_and_scoring(tiny_world, tmp_path):
    """Two different policies, judged by a reward checkpoint; the expected GRA is computed independently: greedy
    answers from transformers' generate, scores from its sequence-classification model, the naive win rate."""
    import transformers
    from model import GPT, load_model, save_model
    other = tmp_path / "other"
    torch.manual_seed(1)
    policy = GPT(load_model(tiny_world["model"]).config)
    for p in policy.parameters():  # large random weights: varied answers, unlike the small-init model's
        torch.nn.init.normal_(p, std=0.5)
    save_model(policy, str(other))
    judge = tmp_path / "judge"
    torch.manual_seed(2)
    save_model(load_model(tiny_world["model"], reward=True), str(judge))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world["model"], name), other / name)
        shutil.copy(os.path.join(tiny_world["model"], name), judge / name)
    prompts = sorted({json.loads(line)["prompt"] for line in open(tiny_world["pairs"])})[:20]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_world["model"])
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(judge)).eval()
    scores = {}
    for name, path in (("policy", tiny_world["model"]), ("sft", str(other))):
        lm = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        scores[name] = []
        for prompt in prompts:
            ids = torch.tensor([tok(prompt).input_ids])
            new = lm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            text = tok.decode(new)
            seq = tok(prompt).input_ids + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            scores[name].append(rm(torch.tensor([seq])).logits[0, 0].item())
    wins = [(p > s) + 0.5 * (p == s) for p, s in zip(scores["policy"], scores["sft"])]
    expected = 100 * np.mean(wins)
    assert expected != 50.0  # the two policies' answers differ, and the judge prefers one of them
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--policy", tiny_world["model"], "--sft", str(other),
           "--prompts", tiny_world["pairs"], "--judge", str(judge), "--eval-prompts", "20", "--max-new-tokens", "8"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 20 and result["gra"] == pytest.approx(expected)


def test_the_judge_reads_text_with_its_own_tokenizer(tiny_world, tmp_path, capsys):
    """A judge with a tokenizer of its own (other merges, other ids): its scores are recomputed here with
    transformers from the judge's folder alone. Bug caught: the judge fed the policy's token ids."""
    import random
    import transformers
    import eval as gra
    import world
    from model import RewardModel, config_from_hf, save_model
    judge = tmp_path / "judge"
    rng = random.Random(7)
    texts = [p.upper() + world.world_answer(p, rng)[::-1] for p in world.world_prompts(200, seed=7)]
    jtok = world.train_tokenizer(texts, 400, str(judge))  # 400 ids as the policy's: a mix-up would not fail loudly
    policy_tok = transformers.AutoTokenizer.from_pretrained(tiny_world["model"])
    prompts = sorted({json.loads(line)["prompt"] for line in open(tiny_world["pairs"])})[:6]
    assert [jtok.encode(p).ids for p in prompts] != [policy_tok(p).input_ids for p in prompts]
    hf = json.load(open(os.path.join(tiny_world["model"], "config.json")))
    hf.update(bos_token_id=jtok.bos_id, eos_token_id=jtok.eos_id, pad_token_id=jtok.pad_id)
    torch.manual_seed(3)
    save_model(RewardModel(config_from_hf(hf)), str(judge))
    gra.main(gra.parse_args(["--policy", tiny_world["model"], "--sft", tiny_world["model"], "--judge", str(judge),
                             "--prompts", tiny_world["pairs"], "--eval-prompts", "6", "--max-new-tokens", "6"]))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = transformers.AutoModelForCausalLM.from_pretrained(tiny_world["model"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(judge))
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(judge)).eval()
    scores = []
    for prompt in prompts:
        ids = torch.tensor([policy_tok(prompt).input_ids])
        new = lm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=policy_tok.eos_token_id,
                          pad_token_id=policy_tok.pad_token_id)[0, ids.shape[1]:].tolist()
        answer = policy_tok.decode(new[:new.index(policy_tok.eos_token_id)] if policy_tok.eos_token_id in new else new)
        seq = tok(prompt).input_ids + tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            scores.append(rm(torch.tensor([seq])).logits[0, 0].item())
    assert result["prompts"] == 6 and result["gra"] == 50.0  # the policy against itself
    assert result["mean_policy_score"] == pytest.approx(np.mean(scores), rel=1e-4, abs=1e-5)


def cli_line(argv, capsys):
    """What `eval.py ARGV` says before any work: argparse's line, or run_script's `error: ...`."""
    import eval as gra
    with pytest.raises(SystemExit) as info:
        runs.run_script(gra.main, gra.parse_args(argv))
    return str(info.value.code) + capsys.readouterr().err


def test_bad_flags_are_one_line_before_any_work(tiny_world, tmp_path, capsys):
    from model import GPT, RewardModel, config_from_hf, load_model, save_model
    out = tmp_path / "experiment"
    gra = ["--policy", tiny_world["model"], "--sft", tiny_world["model"], "--prompts", tiny_world["pairs"]]
    lm_judge = ["--judge", tiny_world["model"]]  # a causal LM folder: no score.weight
    gpt2 = dict(model_type="gpt2", vocab_size=400, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    save_model(GPT(config_from_hf(gpt2)), str(tmp_path / "gpt2"))
    save_model(load_model(tiny_world["model"], reward=True), str(tmp_path / "judge"))
    save_model(RewardModel(config_from_hf(gpt2)), str(tmp_path / "gpt2-judge"))
    save_model(load_model(tiny_world["model"], reward=True), str(tmp_path / "bare-judge"))  # no tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for folder in ("gpt2", "judge", "gpt2-judge"):
            shutil.copy(os.path.join(tiny_world["model"], name), tmp_path / folder / name)
    cases = [  # (flags, what the line must say); the bug each catches: a traceback, NaN results or a silent run
        (gra + lm_judge, "lacks tensor 'score.weight': a trained scalar head is needed"),  # GRA 0 or 100 at random
        (gra[:2] + gra[4:], "--policy, --sft, --judge and --prompts go together; given only --policy, --prompts"),
        (gra[:2], "given only --policy"),  # AttributeError: a None path
        (["--judge", str(tmp_path / "judge")], "given only --judge"),  # ran the 8-minute experiment instead
        (["--eval-prompts", "0"], "argument --eval-prompts: must be an integer >= 1"),  # a table of NaN
        (gra + lm_judge + ["--top-p", "0"], "--temperature must be >= 0 and --top-p in (0, 1]"),  # NaN samples
        (["--seeds", "0"], "argument --seeds: must be an integer >= 1"),  # "min() arg is an empty sequence"
        (["--samples", "0"], "argument --samples: must be an integer >= 1"),  # "cannot reshape"
        (["--beta", "-1"], "argument --beta: must be a positive number"),
        (["--lr", "0"], "argument --lr: must be a positive number"),
        (["--out", str(out), "--labeled-fraction", "0"], "--labeled-fraction 0.0 of --pairs 2000 leaves no labeled"),
        (["--out", str(out), "--labeled-fraction", "1"], "leaves no labeled or no unlabeled pair"),  # torch.cat([])
        (["--out", str(out), "--sweep", "--labeled-fraction", "0.2"], "leave out --labeled-fraction"),  # ignored
        (["--policy", str(tmp_path / "gpt2"), "--sft", tiny_world["model"], "--prompts", tiny_world["pairs"],
          "--judge", str(tmp_path / "judge"), "--max-new-tokens", "60"], "gpt2's max_position_embeddings 64"),
        (gra + ["--judge", str(tmp_path / "gpt2-judge"), "--max-new-tokens", "60"],  # before generation, not after
         "the prompts + --max-new-tokens + EOS exceed " + str(tmp_path / "gpt2-judge") + "'s max_position_embeddings"),
        # issue 24: a model read with another's tokenizer; a RoPE model's KV cache of 32 TB
        (gra + ["--judge", str(tmp_path / "bare-judge")], "bare-judge: no tokenizer.json"),
        (gra + ["--judge", str(tmp_path / "judge"), "--max-new-tokens", "1000000000000"],
         "the prompts + --max-new-tokens exceed " + tiny_world["model"] + "'s max_position_embeddings 256"),
    ]
    for flags, message in cases:
        line = cli_line(flags, capsys)
        assert message in line and "Traceback" not in line, (flags, line)
    assert not out.exists()  # nothing written: every check ran before the world was built


def test_an_explicit_flag_wins_over_quick():
    import eval as gra
    args = gra.parse_args(["--quick", "--seeds", "1", "--pairs", "50"])  # bug: silently 2 seeds and 800 pairs
    assert (args.seeds, args.pairs, args.eval_prompts, args.sft_examples) == (1, 50, 100, 800)
    assert (gra.parse_args([]).seeds, gra.parse_args([]).pairs) == (5, 2000)


def test_judge_scores_checks_the_lengths_it_reads(tiny_world):
    # the judge re-tokenizes each answer: with a tokenizer of its own it may read more tokens than were generated
    from judges import judge_scores
    from model import RewardModel, config_from_hf
    from formats import load_tokenizer
    gpt2 = dict(model_type="gpt2", vocab_size=400, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    judge, tok = RewardModel(config_from_hf(gpt2)), load_tokenizer(tiny_world["model"])
    with pytest.raises(ValueError, match=r"the prompts \+ answers it reads exceed J's max_position_embeddings 64"):
        judge_scores("J", judge, tok, ["\n\nHuman: hi\n\nAssistant:"], [" Sure!" * 40], torch.device("cpu"))
    assert len(judge_scores("J", judge, tok, ["\n\nHuman: hi\n\nAssistant:"], [" Sure!"], torch.device("cpu"))) == 1


# --- issue 24: every model is read with its own tokenizer

def own_tokenizer_model(tiny_world, folder, vocab_size, seed, reward=False):
    """A model of the tiny world's shape with a tokenizer of its own (other texts, other merges, other ids)."""
    import random
    import world
    from model import GPT, RewardModel, config_from_hf, save_model
    rng = random.Random(seed)
    texts = [p.upper() + world.world_answer(p, rng)[::-1] for p in world.world_prompts(200, seed=seed)]
    tok = world.train_tokenizer(texts, vocab_size, str(folder))
    hf = json.load(open(os.path.join(tiny_world["model"], "config.json")))
    hf.update(vocab_size=tok.get_vocab_size(), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    model = (RewardModel if reward else GPT)(config_from_hf(hf))
    for p in model.parameters():  # large random weights: varied answers
        torch.nn.init.normal_(p, std=0.5)
    save_model(model, str(folder))
    return tok


def test_the_sft_model_answers_with_its_own_tokenizer(tiny_world, tmp_path, monkeypatch, capsys):
    import data
    import eval as gra
    import formats
    import judges
    from generate import generate_answers
    from model import load_model
    from formats import load_tokenizer
    sft = tmp_path / "sft"
    sft_tok = own_tokenizer_model(tiny_world, sft, 300, seed=5)
    judge = tmp_path / "judge"
    own_tokenizer_model(tiny_world, judge, 400, seed=6, reward=True)
    seen = {}

    def recorded(path, judge_model, judge_tok, prompts, answers, device, batch_size=32):
        seen[len(seen)] = answers
        return [0.0] * len(answers)
    monkeypatch.setattr(judges, "judge_scores", recorded)
    gra.main(gra.parse_args(["--policy", tiny_world["model"], "--sft", str(sft), "--judge", str(judge),
                             "--prompts", tiny_world["pairs"], "--eval-prompts", "4", "--max-new-tokens", "5"]))
    prompts = sorted({p["prompt"] for p in formats.load_pairs(tiny_world["pairs"])})[:4]
    ids = [data.encode_prompt(sft_tok, p, 256) for p in prompts]
    expected = generate_answers(load_model(str(sft)), load_tokenizer(str(sft)), ids, 5)
    assert seen[1] == expected  # bug: prompts encoded and answers decoded with the policy's tokenizer


def test_a_judge_trained_by_train_weak_carries_and_reads_its_own_tokenizer(tiny_world, tmp_path, capsys):
    import eval as gra
    import train_weak
    base, judge = tmp_path / "small-base", tmp_path / "judge"
    own_tokenizer_model(tiny_world, base, 300, seed=8)
    runs.run_script(train_weak.main, train_weak.parser().parse_args([
        "--model", str(base), "--data", tiny_world["pairs"], "--out", str(judge), "--max-steps", "1",
        "--batch-size", "4"]))
    assert (judge / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()  # bug: none copied
    capsys.readouterr()
    gra.main(gra.parse_args(["--policy", tiny_world["model"], "--sft", tiny_world["model"], "--judge", str(judge),
                             "--prompts", tiny_world["pairs"], "--eval-prompts", "3", "--max-new-tokens", "4"]))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # bug: refused, "400 tokens, more
    assert result["gra"] == 50.0 and result["prompts"] == 3  # than the vocab_size 300" (the policy's tokenizer)


# ----------------------------------------------------------------------------- GRA's files, other judges

def test_gra_files_hold_every_prompt_and_a_rescoring_needs_no_generation(tiny_world, tmp_path):
    """answers.jsonl: every prompt with both models' sampled answers, the judge's scores and the outcome; GRA
    recomputed from it (naive formula) equals summary.json's, which is the line printed. A rerun with --answers
    scores the same answers with another judge, from the file alone (the policy folders are gone)."""
    from model import load_model, save_model
    for name, seed in (("policy", 1), ("sft", 2), ("judge", 3), ("judge2", 4)):
        torch.manual_seed(seed)
        save_model(load_model(tiny_world["model"], reward=name.startswith("judge")), str(tmp_path / name))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tiny_world["model"], file), tmp_path / name / file)
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--policy", str(tmp_path / "policy"), "--sft",
           str(tmp_path / "sft"), "--prompts", tiny_world["pairs"], "--judge", str(tmp_path / "judge"),
           "--eval-prompts", "7", "--samples", "2", "--temperature", "1.5", "--top-p", "0.9", "--seed", "5",
           "--max-new-tokens", "6", "--out", str(tmp_path / "gra")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in open(tmp_path / "gra" / "answers.jsonl")]
    summary = json.load(open(tmp_path / "gra" / "summary.json"))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    prompts = sorted({json.loads(line)["prompt"] for line in open(tiny_world["pairs"])})[:7]
    assert [r["prompt"] for r in records] == prompts and summary["prompts"] == 7
    for r in records:
        assert len(r["policy"]) == len(r["sft"]) == len(r["policy_scores"]) == len(r["sft_scores"]) == 2
        assert r["policy_score"] == pytest.approx(np.mean(r["policy_scores"]))
        p, s = np.mean(r["policy_scores"]), np.mean(r["sft_scores"])
        assert r["outcome"] == (1.0 if p > s else 0.5 if p == s else 0.0)
        for name in ("policy", "sft"):  # each sample scored: different answers, different scores
            assert (r[name][0] == r[name][1]) == (r[f"{name}_scores"][0] == r[f"{name}_scores"][1])
    assert any(r["policy"][0] != r["policy"][1] for r in records)  # sampled: two different answers
    gra = 100 * np.mean([(np.mean(r["policy_scores"]) > np.mean(r["sft_scores"])) +
                         0.5 * (np.mean(r["policy_scores"]) == np.mean(r["sft_scores"])) for r in records])
    assert summary["gra"] == pytest.approx(gra) and summary["lo"] <= summary["gra"] <= summary["hi"]
    assert summary["mean_sft_score"] == pytest.approx(np.mean([np.mean(r["sft_scores"]) for r in records]))
    assert (summary["settings"]["samples"], summary["settings"]["seed"], summary["settings"]["top_p"]) == (2, 5, 0.9)

    shutil.rmtree(tmp_path / "policy")
    shutil.rmtree(tmp_path / "sft")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--answers", str(tmp_path / "gra" / "answers.jsonl"),
           "--judge", str(tmp_path / "judge2"), "--out", str(tmp_path / "again")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = [json.loads(line) for line in open(tmp_path / "again" / "answers.jsonl")]
    assert [(r["prompt"], r["policy"], r["sft"]) for r in again] == [(r["prompt"], r["policy"], r["sft"])
                                                                     for r in records]
    assert [r["policy_scores"] for r in again] != [r["policy_scores"] for r in records]  # the other judge's


def write_answers(path, prompts):
    records = [{"prompt": p, "policy": [f" answer {i} of the policy"], "sft": [f" the SFT's {i}"]}
               for i, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_a_deberta_v2_judge_gives_the_scores_transformers_gives(tiny_world, tmp_path, capsys):
    """A tiny random DeBERTa-v2 sequence classifier (the architecture of OpenAssistant's reward models), scored
    through transformers; expected: its logits on [BOS] prompt [BOS] answer, the text pair built here by hand
    from the tokenizer's pieces. Bugs caught: the answer scored alone, prompt and answer read as one text."""
    import transformers
    from tokenizers import Tokenizer
    import eval as gra
    judge = tmp_path / "deberta"
    config = transformers.DebertaV2Config(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, num_labels=1, pad_token_id=2,
                                          initializer_range=0.5)  # scores apart by more than rounding
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(config).save_pretrained(judge)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world["model"], file), judge / file)
    prompts = sorted({json.loads(line)["prompt"] for line in open(tiny_world["pairs"])})[:4]
    records = write_answers(tmp_path / "answers.jsonl", prompts)
    gra.main(gra.parse_args(["--answers", str(tmp_path / "answers.jsonl"), "--judge", str(judge), "--out",
                             str(tmp_path / "gra")]))
    got = [json.loads(line) for line in open(tmp_path / "gra" / "answers.jsonl")]
    tok = Tokenizer.from_file(str(judge / "tokenizer.json"))
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(judge)).eval()
    bos = tok.token_to_id(json.load(open(judge / "tokenizer_config.json"))["bos_token"])
    for r, g in zip(records, got):
        for name in ("policy", "sft"):
            ids = [bos] + tok.encode(r["prompt"], add_special_tokens=False).ids + [bos]
            ids += tok.encode(r[name][0], add_special_tokens=False).ids
            with torch.no_grad():
                expected = rm(torch.tensor([ids])).logits[0, 0].item()
            assert g[f"{name}_scores"] == [pytest.approx(expected, rel=1e-4)]
    scores = sorted(g["policy_score"] for g in got)
    assert min(np.diff(scores)) > 1e-2  # the scores differ: a real comparison


def test_bad_judges_and_answers_are_one_line_and_write_nothing(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gra"
    write_answers(tmp_path / "answers.jsonl", ["p1", "p2"])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "policy": ["a"], "sft": "b"}\n')
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    shutil.copy(os.path.join(tiny_world["model"], "tokenizer.json"), unknown / "tokenizer.json")
    rescore = ["--answers", str(tmp_path / "answers.jsonl"), "--out", str(out)]
    cases = [  # (flags, what the line must say)
        (rescore + ["--judge", str(unknown)], f"{unknown / 'config.json'}: model_type 'no-such-architecture' is "
                                              "read neither by cwpo's loader (gpt2, opt, llama, qwen2"),
        (["--answers", str(tmp_path / "bad.jsonl"), "--judge", tiny_world["model"]],
         "bad.jsonl, line 1: key 'sft' must be a string list (the answers)"),
        (rescore + ["--judge", tiny_world["model"], "--policy", tiny_world["model"]],
         "--answers goes with --judge alone; given --policy, --judge"),
    ]
    for flags, message in cases:
        line = cli_line(flags, capsys)
        assert message in line.strip().splitlines()[-1] and "Traceback" not in line, (flags, line)  # argparse's
        assert len(line.strip().splitlines()) == 1 or line.startswith("2usage")  # usage lines come first
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed: the import fails
    line = cli_line(rescore + ["--judge", str(unknown)], capsys)
    assert "is scored through the package transformers, which is not installed" in line, line
    assert not out.exists()
