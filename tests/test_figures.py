"""tools/figures.py: the experiment's results.json -> markdown and SVG, all or none, and one line on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_weak
import world
from tools import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_results(n_seeds):
    """A results dict as world.experiment writes it (through its own summary and checks), from made-up seeds."""
    methods, rng, seeds = (world.REFERENCE, "CW-DPO"), np.random.default_rng(0), []
    for s in range(n_seeds):
        confidence = rng.random(50)
        report = train_weak.annotator_report(confidence, rng.random(50) < 0.5 + confidence / 2)
        gra = {m: 60.0 + 7 * s + 3 * i * (s + 1) for i, m in enumerate(methods)}
        seeds.append({"annotator_vs_gold": report, "human_vs_gold": 0.7, "shorter": {"annotator": 0.8, "humans": 0.6},
                      "methods": {m: {"gra": g, "gra_judge": g - 5, "gra_greedy": 55.0, "words": 9.0}
                                  for m, g in gra.items()}})
    judge = {"pairs": 250, "vs_gold": 0.75, "gold_shorter": 0.68, "shorter": 0.7, "sft_words": 11.0}
    run = {"labeled_fraction": 0.3, "noise": "random", "judge": judge, "seeds": seeds,
           "summary": world.summarize(seeds, methods), "summary_judge": world.summarize(seeds, methods, "gra_judge"),
           "checks": world.world_checks(seeds), "claims": world.claims(seeds, methods)}
    return world.finite_or_null({"args": {"eval_prompts": 60, "samples": 4, "pairs": 50}, "runs": [run], "seconds": 6})


def test_one_seed_gives_no_interval_no_verdict_and_valid_json():
    results = fake_results(1)
    row = results["runs"][0]["summary"]["CW-DPO"]
    assert (row["lo"], row["hi"], row["diff_lo"], row["diff_hi"]) == (None, None, None, None)  # bug: NaN in the JSON
    assert row["verdict"] == ""  # bug: "no difference shown" from NaN bounds
    json.dumps(results, allow_nan=False)
    table = figures.results_markdown(results, world.REFERENCE)
    assert f"| CW-DPO | {row['gra']:.1f} | {row['diff']:+.1f} |  |" in table and "nan" not in table
    svgs = figures.render_figures(results)
    assert sorted(svgs) == ["gra-30.svg", "gra-judge-30.svg", "reliability-30.svg"]
    assert not any('"nan' in svg or "nan\"" in svg for svg in svgs.values())  # bug: x1="nan" coordinates


def test_two_seeds_draw_intervals():
    row = fake_results(2)["runs"][0]["summary"]["CW-DPO"]
    assert row["lo"] < row["gra"] < row["hi"] and row["verdict"] == "no difference shown"
    assert f'x1="{230 + row["lo"] / 100 * (640 - 230 - 20)}"' in figures.render_figures(fake_results(2))["gra-30.svg"]


def test_bad_results_files_are_one_line_and_write_no_figure(tmp_path):
    good = fake_results(2)
    broken = json.loads(json.dumps(good))
    del broken["runs"][0]["summary"]  # the old code wrote the reliability diagram, then failed on the GRA figure
    cases = {"empty.json": ("{}", "missing or malformed key: KeyError('runs')"),
             "cut.json": (json.dumps(good)[:300], "not valid JSON"),
             "broken.json": (json.dumps(broken), "KeyError('summary')"),
             "missing.json": (None, "No such file or directory")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        out = tmp_path / ("figures-" + name)
        run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "figures.py"), str(tmp_path / name), str(out)],
                             capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, (name, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and not out.exists(), name
    (tmp_path / "good.json").write_text(json.dumps(good))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "figures.py"), str(tmp_path / "good.json"),
                          str(tmp_path / "ok")], capture_output=True, text=True)
    assert run.returncode == 0 and sorted(os.listdir(tmp_path / "ok")) == ["gra-30.svg", "gra-judge-30.svg",
                                                                      "reliability-30.svg"]


def test_non_finite_numbers_draw_no_figure(tmp_path):
    good = json.dumps(fake_results(2))
    row = fake_results(2)["runs"][0]["summary"]["CW-DPO"]
    for name, value in (("nan", "NaN"), ("inf", "Infinity"), ("huge", "1e999")):  # bug: cx="nan", cx="inf"
        (tmp_path / name).write_text(good.replace(json.dumps(row["gra"]), value, 1))
        out = tmp_path / ("figures-" + name)
        run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "figures.py"), str(tmp_path / name),
                              str(out)], capture_output=True, text=True)
        assert run.returncode != 0 and "not a finite number" in run.stderr and not out.exists(), run.stderr
    with pytest.raises(ValueError, match="not a finite number"):  # drawn from Python, not from a file
        figures.gra_svg({"x": {"gra": float("nan"), "lo": None, "hi": None}}, "t")
