"""world.py: the built-in world's tokenizer, gold reward and noisy human labels against hand computations, and a
small experiment whose table is recomputed from its results.json and whose world checks must hold. Expected values
are written out by hand or computed by naive formulas here, never taken from world.py's own output."""
import argparse
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import formats
import runs
import world
from tools import figures


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_tokenizer_files_round_trip_and_bos(tok, tmp_path):
    out = tmp_path / "tok"
    tok2 = world.train_tokenizer(["hello world"] * 10 + world.world_prompts(50, seed=1), 300, str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tok2.bos_id, tok2.eos_id, tok2.pad_id}) == 3 and None not in (tok2.bos_id, tok2.eos_id, tok2.pad_id)
    assert tok.get_vocab_size() == 300
    for text in world.world_prompts(20, seed=9) + [" I'm sorry, naïve ☃ café!\n\n  x", "", "\t\t$%^"]:
        ids = tok.encode(text).ids
        assert ids[0] == tok.bos_id and tok.encode(text, add_special_tokens=False).ids == ids[1:]
        assert tok.decode(ids) == text  # special tokens are skipped by default
    # An independent reader of the saved folder: transformers' fast tokenizer gives the same ids.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(out))
    text = world.world_prompts(1, seed=5)[0] + " Try the lemonade."
    assert hf(text)["input_ids"] == tok2.encode(text).ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok2.bos_id, tok2.eos_id, tok2.pad_id)


# ----------------------------------------------------------------------------- the built-in world

SNACK_SWEET = "\n\nHuman: Can you suggest a snack? I like sweet food.\n\nAssistant:"
SNACK_SPICY = "\n\nHuman: What snack should I get? I am in the mood for something spicy.\n\nAssistant:"
POPCORN = " Sure! Try the caramel popcorn. It is sweet. Enjoy!"


def test_world_prompts_are_seeded_hh_transcripts_the_loader_reads(tmp_path):
    prompts = world.world_prompts(50, seed=2)
    assert prompts == world.world_prompts(50, seed=2) and prompts != world.world_prompts(50, seed=3)
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") and p.count("Assistant:") == 1
               for p in prompts)
    rng = random.Random(0)
    records = [{"chosen": p + world.world_answer(p, rng), "rejected": p + " Whatever."} for p in prompts]
    loaded = formats.load_pairs(write_records(tmp_path / "world.jsonl", records))
    assert [r["prompt"] for r in loaded] == prompts and all(r["rejected"] == " Whatever." for r in loaded)


def test_parse_request():
    assert world.parse_request(SNACK_SWEET) == {"category": "snack", "like": "sweet", "brief": False}
    assert world.parse_request(SNACK_SPICY.replace("spicy.", "spicy. Please keep it short.")) == \
        {"category": "snack", "like": "spicy", "brief": True}
    assert world.parse_request("\n\nHuman: Hello.\n\nAssistant:") == {"category": None, "like": None, "brief": False}


def test_gold_reward_judges_the_answer_against_the_prompt():
    # Hand-computed from the documented formula. Caramel popcorn: a sweet snack.
    assert world.gold_reward(SNACK_SWEET, POPCORN) == pytest.approx(1.5 + 1.0 + 0.5)  # category, taste, polite
    assert world.gold_reward(SNACK_SPICY, POPCORN) == pytest.approx(1.5 + 0.5)  # the same answer, another taste
    assert world.gold_reward(SNACK_SPICY, " Sure! Try the chili chips. It is spicy. Enjoy!") == pytest.approx(3.0)
    assert world.gold_reward(SNACK_SWEET, " Try the hot chocolate.") == pytest.approx(-1.5 + 1.0)  # a drink
    assert world.gold_reward(SNACK_SWEET, " Try the chili chips. It is sweet.") == pytest.approx(1.5 - 1.0)  # a lie
    assert world.gold_reward(SNACK_SWEET, " Try the lemon candy or the caramel popcorn.") == pytest.approx(1.5)
    assert world.gold_reward(SNACK_SWEET, " Ugh, fine. Try the caramel popcorn. Enjoy!") == pytest.approx(2.0)
    assert world.gold_reward(SNACK_SWEET, " Sure!") == pytest.approx(-3.0 + 0.5)  # no item
    long = POPCORN + " Many people like it. It is very popular."
    assert world.gold_reward(SNACK_SWEET, long) == pytest.approx(3.0 - 0.5 * 2)
    brief = SNACK_SWEET.replace("food.", "food. Please keep it short.")
    assert world.gold_reward(brief, long) == pytest.approx(3.0 - 1.0 * 2)


def test_gold_reward_never_raises_on_garbled_answers():
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz .!?,'()[]*+\\|$^\n0123456789ñ☃"
    garbled = ["", " ", "((((", "it is it is", "\x00\ufffd", "the the the", " Try the the caramel caramel popcorn!!"]
    garbled += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    words = " ".join(world.world_prompts(20, seed=0) + [world.world_answer(p, rng) for p in world.world_prompts(20, 1)])
    garbled += [" ".join(rng.choices(words.split(), k=rng.randint(1, 30))) for _ in range(300)]
    for prompt in (SNACK_SWEET, "", "Human: ????", "\n\nHuman: I like like\n\nAssistant:"):
        for answer in garbled:
            reward = world.gold_reward(prompt, answer)
            assert isinstance(reward, float) and math.isfinite(reward)


def test_world_answers_vary_with_care_and_pairs_span_easy_and_hard():
    prompts = world.world_prompts(600, seed=11)
    rng = random.Random(1)
    means = [np.mean([world.gold_reward(p, world.world_answer(p, rng, care)) for p in prompts]) for care in (0, 0.5, 1)]
    assert means[2] > means[1] + 1.0 > means[0] + 2.0
    answers = [world.world_answer(p, rng) for p in prompts]
    assert all(a.startswith(" ") for a in answers) and len(set(answers)) > 300
    assert [world.world_answer(p, random.Random(5)) for p in prompts[:20]] == \
           [world.world_answer(p, random.Random(5)) for p in prompts[:20]]
    gaps = np.abs([world.gold_reward(p, world.world_answer(p, rng)) - world.gold_reward(p, world.world_answer(p, rng))
                   for p in prompts])
    assert np.mean((gaps > 0) & (gaps <= 1.0)) > 0.15 and np.mean(gaps >= 3.0) > 0.15


def test_human_label_follows_bradley_terry():
    rng = np.random.default_rng(0)  # a numpy Generator works as well as random.Random
    n, T = 20000, 2.0
    for gap in (-3.0, -0.5, 0.0, 1.0, 4.0):
        p_naive = 1.0 / (1.0 + math.exp(-gap / T))
        rate = np.mean([world.human_label(gap, 0.0, T, rng) for _ in range(n)])
        assert abs(rate - p_naive) < 4 * math.sqrt(p_naive * (1 - p_naive) / n) + 1e-9
    assert world.human_label(1e6, 0.0, 1e-3, rng) and not world.human_label(0.0, 1e6, 1e-3, rng)  # no overflow
    assert world.human_label(1.0, 0.5, 0.0, rng) and not world.human_label(0.5, 1.0, 0.0, rng)


@pytest.mark.parametrize("target", [0.70, 0.85])
def test_human_temperature_gives_the_target_agreement_with_gold(target):
    # Pairs as the pipeline makes them: two sampled answers to one prompt; gold ties have no ranking to agree with.
    rng = random.Random(2024)
    gaps = []
    for prompt in world.world_prompts(8000, seed=2024):
        gaps.append(world.gold_reward(prompt, world.world_answer(prompt, rng)) -
                    world.gold_reward(prompt, world.world_answer(prompt, rng)))
    temperature = world.human_temperature(gaps, target)
    labels = [(world.human_label(g, 0.0, temperature, rng), g > 0) for g in gaps if g != 0]
    agreement = np.mean([label == truth for label, truth in labels])
    assert abs(agreement - target) < 0.02  # tolerance: 0.02 (sampling s.d. is about 0.005 here)


def random_pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": p, "chosen": a, "rejected": b, "gold_margin": world.gold_reward(p, a) - world.gold_reward(p, b)}
            for p, a, b in ((p, world.world_answer(p, rng), world.world_answer(p, rng))
                            for p in world.world_prompts(n, seed=seed))]


def test_systematic_humans_agree_at_the_target_and_every_error_favours_the_longer_answer():
    pairs = random_pairs(2000, seed=6)  # solved on the pairs it labels, as build_world's pool
    fit = pairs
    length = len  # in characters
    bias = world.human_bias([p["gold_margin"] for p in fit],
                            [length(p["chosen"]) - length(p["rejected"]) for p in fit], 0.70)
    labeled = world.human_labels(pairs, "systematic", bias, random.Random(0))
    ranked = [h for h in labeled if h["gold_margin"]]  # gold_margin follows the human's order
    assert abs(np.mean([h["gold_margin"] > 0 for h in ranked]) - 0.70) < 0.02
    errors = [h for h in ranked if h["gold_margin"] < 0]
    assert len(errors) > 300 and all(length(h["chosen"]) > length(h["rejected"]) for h in errors)
    gold = [p if p["gold_margin"] > 0 else world.swapped(p) for p in pairs if p["gold_margin"]]
    assert world.shorter_share(labeled) < world.shorter_share(gold) - 0.2  # the bias shows in the labels
    # random humans at the same agreement: their errors do not follow length
    temperature = world.human_temperature([p["gold_margin"] for p in fit], 0.70)
    errors = [h for h in world.human_labels(pairs, "random", temperature, random.Random(0)) if h["gold_margin"] < 0]
    assert 0.3 < np.mean([length(h["chosen"]) > length(h["rejected"]) for h in errors]) < 0.7


class BangCounter(torch.nn.Module):
    """A stand-in judge whose score is the number of "!" in each answer it reads (data.collate's scored tokens)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, input_ids, layout):
        answers = [layout["score_target"][layout["score_answer"] == a] for a in range(len(layout["last_index"]))]
        return torch.tensor([float(self.tok.decode(ids.tolist()).count("!")) for ids in answers])


def test_judged_gra_averages_each_prompts_samples_before_comparing(tok):
    prompts = world.world_prompts(3, seed=0)
    bangs = lambda counts: [" ok" + "!" * k for k in counts]  # noqa: E731
    policy, sft = bangs([1, 3, 0, 4, 2, 0]), bangs([2, 2, 1, 1, 0, 1])  # 2 samples per prompt, in a row
    # by hand: means 2 vs 2 (tie, 0.5), 2 vs 1 (win), 1 vs 0.5 (win) -> 2.5 / 3; the first sample alone: 1 / 3
    args = argparse.Namespace(max_prompt_len=48, max_answer_len=64, batch_size=4, log_every=1)
    result = world.judged_gra(BangCounter(tok), tok, prompts, policy, sft, args, "cpu")
    assert result["gra"] == pytest.approx(100 * 2.5 / 3)


def test_one_seed_gives_one_annotator_whatever_ran_before(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), pairs=200, eval_prompts=2, samples=1, sft_examples=200)
    base = world.build_world(args, torch.device("cpu"), lambda _: None)._replace(judge=(None, None))
    runs = []
    for draws in (0, 1000):  # another mode runs other models first: the global generator is elsewhere
        torch.rand(draws)
        runs.append(world.run_seed(1, base, args, 0.3, (), torch.device("cpu"), lambda _: None, lambda *_: None))
    assert runs[0]["annotator_vs_gold"] == runs[1]["annotator_vs_gold"]
    assert runs[0]["annotator_vs_gold"]["ece"] > 0  # scores, not ties


def test_interval_is_the_t_interval():
    values = [1.0, 2.0, 4.0, 7.0, 11.0]  # s.d. 4.0620, t(0.975, 4 df) = 2.776
    mean, half = world.interval(values)
    assert mean == 5.0 and half == pytest.approx(2.776 * 4.0620 / 5 ** 0.5, rel=1e-3)
    assert world.interval([3.0])[0] == 3.0 and np.isnan(world.interval([3.0])[1])  # no interval from one


def test_small_experiment_table_is_recomputed_from_results_and_world_checks_hold(tmp_path, monkeypatch, capsys):
    # small enough for the suite (about a minute), large enough that the world checks below hold at this scale
    methods = ("DPO, human 100 %", "DPO, labeled part only", "CW-DPO")
    monkeypatch.setattr(world, "METHODS", {name: world.METHODS[name] for name in methods})
    args = argparse.Namespace(out=str(tmp_path), sweep=False, seeds=2, pairs=600, eval_prompts=60, samples=4,
                              sft_examples=600, epochs=2, lr=3e-4, beta=0.3, labeled_fraction=0.3, study=False)
    world.experiment(args)
    assert "seed 2 of 2 | step 8 of 8" in capsys.readouterr().out  # progress: seed k of N, step m of M
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["runs"][0]
    table = (tmp_path / "results.md").read_text()
    for name in methods:  # mean, t-interval and paired difference, recomputed from the per-seed numbers
        gra = [s["methods"][name]["gra"] for s in run["seeds"]]
        diff = [g - s["methods"][methods[0]]["gra"] for g, s in zip(gra, run["seeds"])]
        half = 12.71 * np.std(gra, ddof=1) / np.sqrt(2)
        assert f"| {name} | {np.mean(gra):.1f} [{np.mean(gra) - half:.1f}, {np.mean(gra) + half:.1f}] |" in table
        if name != methods[0]:
            assert f"{np.mean(diff):+.1f} [{np.mean(diff) - 12.71 * np.std(diff, ddof=1) / np.sqrt(2):+.1f}" in table
        judged = [s["methods"][name]["gra_judge"] for s in run["seeds"]]  # the learned judge's column beside it
        half = 12.71 * np.std(judged, ddof=1) / np.sqrt(2)
        assert f"| {np.mean(judged):.1f} [{np.mean(judged) - half:.1f}, {np.mean(judged) + half:.1f}] |" in table
    # the world checks at this scale: preference training must beat SFT, and the annotator must beat chance where
    # it is confident (a flipped loss sign, swapped labels or a dropped human label would fail here)
    for seed in run["seeds"]:
        assert seed["methods"]["DPO, human 100 %"]["gra"] > 55
        assert seed["annotator_vs_gold"]["accuracy_top30"] > seed["annotator_vs_gold"]["accuracy"] > 0.6
    assert {c["check"] for c in run["checks"]} == {c["check"] for c in world.world_checks(run["seeds"])}
    bins = figures.pooled_bins([s["annotator_vs_gold"]["bins"] for s in run["seeds"]])
    assert sum(b["pairs"] for b in bins) == sum(s["annotator_vs_gold"]["pairs"] for s in run["seeds"])
    assert (tmp_path / "reliability-30.svg").read_text().count("<rect") == 1 + len(bins)  # background + a bar a bin


def test_experiment_checks_before_any_work_and_never_leaves_an_old_run_beside_a_new_one(tmp_path, monkeypatch):
    old = ["results.json", "results.md", "gra-30.svg", "reliability-30.svg", "seed4/policy/config.json",
           "sft/config.json", "notes.txt"]
    for name in old:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("an earlier run")
    args = argparse.Namespace(out=str(tmp_path), sweep=False, seeds=1, pairs=10, eval_prompts=5, samples=1,
                              sft_examples=10, epochs=1, lr=1e-3, beta=0.3, labeled_fraction=0.0)
    with pytest.raises(ValueError, match="--labeled-fraction 0.0 of --pairs 10 leaves no labeled"):
        world.experiment(args)  # bug: "no training examples" after the world was built
    with pytest.raises(ValueError, match="leave out --labeled-fraction"):  # bug: --sweep ignored the explicit flag
        world.experiment(argparse.Namespace(**dict(vars(args), sweep=True, labeled_fraction=0.2)))
    assert all((tmp_path / name).exists() for name in old)  # refused before anything was touched
    # stopped with Ctrl-C while the world is built: one line, status 130, and the old results are gone
    monkeypatch.setattr(world, "build_world", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    args.labeled_fraction = 0.3
    with pytest.raises(SystemExit) as info:
        runs.run_script(world.experiment, args)
    assert info.value.code == 130 and sorted(os.listdir(tmp_path)) == ["notes.txt"]  # the user's own file stays
