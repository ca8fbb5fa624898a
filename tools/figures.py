"""The built-in experiment's tables and SVG figures, from its results.json (SVG by hand: no plotting package).

    python tools/figures.py runs/experiment/results.json figures/

reliability_svg: the annotator's reliability diagram (accuracy per confidence bin beside the bin's mean BT
probability, with the pair count per bin); gra_svg: GRA per method with its 95 % interval; results_markdown.
"""
import json
import math
import os
import re
import sys
from xml.sax.saxutils import escape

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 400, 60, 20, 40, 50  # canvas and margins, in pixels


def _svg(width, height, title, body):
    """The SVG document; a coordinate or size that is not a finite number (nan, inf) is refused."""
    bad = re.search(r'="(-?(nan|inf))"', "".join(body))
    if bad:
        raise ValueError(f"{title}: a value to draw is not a finite number ({bad.group(1)})")
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>')
    return head + "".join(body) + "</svg>\n"


def reliability_svg(bins, title):
    """bins: train_weak.annotator_report(...)["bins"] (p_lo, p_hi, pairs, mean_p, accuracy) -> the SVG text: a bar
    per bin at its accuracy, a dot at its mean BT probability (on the diagonal if calibrated), the pair count."""
    x = lambda p: LEFT + (p - 0.5) / 0.5 * (W - LEFT - RIGHT)  # noqa: E731  p in [0.5, 1]
    y = lambda a: H - BOTTOM - a * (H - TOP - BOTTOM)  # noqa: E731  accuracy in [0, 1]
    body = [f'<line x1="{x(0.5)}" y1="{y(0.5)}" x2="{x(1)}" y2="{y(1)}" stroke="gray" stroke-dasharray="4"/>']
    for b in bins:
        body.append(f'<rect x="{x(b["p_lo"]) + 2}" y="{y(b["accuracy"])}" width="{x(b["p_hi"]) - x(b["p_lo"]) - 4}" '
                    f'height="{y(0) - y(b["accuracy"])}" fill="steelblue" opacity="0.7"/>')
        body.append(f'<circle cx="{x(b["mean_p"])}" cy="{y(b["mean_p"])}" r="4" fill="darkorange"/>')
        body.append(f'<text x="{(x(b["p_lo"]) + x(b["p_hi"])) / 2}" y="{y(b["accuracy"]) - 4}" '
                    f'text-anchor="middle" font-size="10">{b["pairs"]}</text>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        body.append(f'<text x="{LEFT - 6}" y="{y(t) + 4}" text-anchor="end">{t:.2f}</text>')
        body.append(f'<text x="{x(0.5 + t / 2)}" y="{H - BOTTOM + 16}" text-anchor="middle">{0.5 + t / 2:.3g}</text>')
    body += [f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">BT probability of the weak label, (1 + C) / 2'
             f'</text>', f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
             'accuracy vs gold (bars; dots: mean probability; numbers: pairs)</text>']
    return _svg(W, H, title, body)


def gra_svg(rows, title, reference=None):
    """rows: {method: {"gra", "lo", "hi"}} -> the SVG text: one horizontal interval per method (none where lo is
    null: one seed), a dot at its mean, a line at 50 (the SFT model) and a dotted line at the reference's mean."""
    row_h, left = 24, 230
    height = TOP + BOTTOM + row_h * len(rows)
    x = lambda g: left + g / 100 * (W - left - RIGHT)  # noqa: E731  GRA in [0, 100]
    body = [f'<line x1="{x(50)}" y1="{TOP}" x2="{x(50)}" y2="{height - BOTTOM}" stroke="gray"/>']
    if reference in rows:
        body.append(f'<line x1="{x(rows[reference]["gra"])}" y1="{TOP}" x2="{x(rows[reference]["gra"])}" '
                    f'y2="{height - BOTTOM}" stroke="gray" stroke-dasharray="3"/>')
    for i, (name, r) in enumerate(rows.items()):
        cy, (lo, hi) = TOP + row_h * (i + 0.5), (r["gra"], r["gra"]) if r["lo"] is None else (r["lo"], r["hi"])
        body += [f'<text x="{left - 8}" y="{cy + 4}" text-anchor="end">{escape(name)}</text>',
                 f'<line x1="{x(lo)}" y1="{cy}" x2="{x(hi)}" y2="{cy}" stroke="steelblue" stroke-width="3"/>',
                 f'<circle cx="{x(r["gra"])}" cy="{cy}" r="4" fill="darkorange"/>',
                 f'<text x="{x(hi) + 6}" y="{cy + 4}" font-size="10">{r["gra"]:.1f}</text>']
    for g in range(0, 101, 25):
        body.append(f'<text x="{x(g)}" y="{height - BOTTOM + 16}" text-anchor="middle">{g}</text>')
    body.append(f'<text x="{(left + W) / 2}" y="{height - 12}" text-anchor="middle">GRA % against the SFT model '
                f'(mean over seeds, 95 % t-interval; solid line: 50)</text>')
    return _svg(W, height, title, body)


def pooled_bins(bin_lists):
    """Reliability bins of several seeds merged bin by bin: pair counts add, mean p and accuracy are pair-weighted."""
    merged = {}
    for bins in bin_lists:
        for b in bins:
            m = merged.setdefault(b["p_lo"], {"p_lo": b["p_lo"], "p_hi": b["p_hi"], "pairs": 0, "mean_p": 0.0,
                                              "accuracy": 0.0})
            m["pairs"] += b["pairs"]
            m["mean_p"] += b["mean_p"] * b["pairs"]
            m["accuracy"] += b["accuracy"] * b["pairs"]
    for m in merged.values():
        m["mean_p"], m["accuracy"] = m["mean_p"] / m["pairs"], m["accuracy"] / m["pairs"]
    return [merged[k] for k in sorted(merged)]


def _interval(mean, lo, hi, sign=""):
    """"5.0 [1.2, 8.8]", or "5.0" alone where the bounds are null (one seed)."""
    return f"{mean:{sign}.1f}" + ("" if lo is None else f" [{lo:{sign}.1f}, {hi:{sign}.1f}]")


def _interval_cells(r, reference_row):
    diff = "" if reference_row else _interval(r["diff"], r["diff_lo"], r["diff_hi"], "+")
    return f"{_interval(r['gra'], r['lo'], r['hi'])} | {diff}"


def results_markdown(results, reference):
    """The experiment's tables as markdown: per human noise and labeled fraction, each method's GRA under the
    program and under the learned judge with its interval, the paired difference to `reference` and its verdict,
    its answers' length; the labelers' agreement with gold and length preference, and the world checks; then the
    paper's claims per judge and noise."""
    args, parts = results["args"], []
    head = (f"GRA: % of {args['eval_prompts']} held-out prompts where the policy's mean gold reward over "
            f"{args['samples']} sampled answers beats the SFT model's (greedy GRA: one greedy answer each); mean over "
            f"seeds with its 95 % t-interval; differences paired by seed. Run time {results['seconds'] / 60:.1f} min.")
    for run in results["runs"]:
        ann = {k: sum(s["annotator_vs_gold"][k] for s in run["seeds"]) / len(run["seeds"])
               for k in ("accuracy", "accuracy_top30", "ece")}
        judge, n = run["judge"], len(run["seeds"])
        shorter = {k: sum(s["shorter"][k] for s in run["seeds"]) / n for k in ("annotator", "humans")}
        humans = sum(s["human_vs_gold"] for s in run["seeds"]) / n
        lines = [f"### {run['noise']} human noise, {run['labeled_fraction']:.0%} labeled, {args['pairs']} pairs, "
                 f"{n} seeds", "", f"| method | GRA % [95 % CI] | minus {reference} [95 % CI] | verdict | learned "
                 f"judge: GRA % [95 % CI] | minus {reference} [95 % CI] | verdict | words per answer | greedy GRA % "
                 f"| per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in run["summary"].items():
            j = run["summary_judge"][name]
            lines.append(f"| {name} | {_interval_cells(r, name == reference)} | {r['verdict']} | "
                         f"{_interval_cells(j, name == reference)} | {j['verdict']} | {r['words']:.1f} | "
                         f"{r['gra_greedy']:.1f} | {' / '.join(f'{g:.1f}' for g in r['per_seed'])} |")
        lines += ["", f"Agreement with gold: humans {humans:.3f}, annotator (unlabeled pairs) {ann['accuracy']:.3f} "
                  f"(its 30 % most confident {ann['accuracy_top30']:.3f}, ECE {ann['ece']:.3f}), learned judge "
                  f"(trained on {judge['pairs']} pairs of its own; on the experiment's pool) {judge['vs_gold']:.3f}. "
                  f"Prefers the shorter answer (pairs whose lengths differ): gold {judge['gold_shorter']:.3f}, humans "
                  f"{shorter['humans']:.3f}, annotator {shorter['annotator']:.3f}, learned judge "
                  f"{judge['shorter']:.3f}; SFT answers {judge['sft_words']:.1f} words. World checks (no CW-PO "
                  f"method):"]
        parts.append("\n".join(lines + [f"- {'PASS' if c['passed'] else 'FAIL'}: {c['check']} ({c['value']:.3f})"
                                        for c in run["checks"]]))
    claims = [(run, claim, c) for run in results["runs"] for claim, c in run["claims"].items()]
    if claims:
        head_lines = ["### The paper's claims (supported: the paired 95 % interval above 0; contradicted: below 0)",
                      "", "| human noise | labeled | claim (judge) | paired difference [95 % CI] | verdict |",
                      "|---|---|---|---|---|"]
        parts.append("\n".join(head_lines +
                               [f"| {run['noise']} | {run['labeled_fraction']:.0%} | {claim} | "
                                f"{_interval(c['diff'], c['lo'], c['hi'], '+')} | {c['verdict']} |" for run, claim, c in claims]))
    return "\n\n".join([head] + parts)


def render_figures(results):
    """{file name: SVG text}: reliability-NN.svg, gra-NN.svg (the program judge) and gra-judge-NN.svg (the learned
    judge) for each labeled fraction NN % of a results.json dict, with "-systematic" before ".svg" for systematic
    human noise; every one drawn before any is written, so that a malformed results file writes none."""
    figures = {}
    for run in results["runs"]:
        pct, n = round(100 * run["labeled_fraction"]), len(run["seeds"])
        noise = "" if run["noise"] == "random" else f"-{run['noise']}"
        bins = pooled_bins([s["annotator_vs_gold"]["bins"] for s in run["seeds"]])
        figures[f"reliability-{pct}{noise}.svg"] = reliability_svg(
            bins, f"Weak annotator ({pct} % labels, {run['noise']} human noise), unlabeled pairs of {n} seeds")
        for summary, judge, name in (("summary", "program", "gra"), ("summary_judge", "learned judge", "gra-judge")):
            figures[f"{name}-{pct}{noise}.svg"] = gra_svg(run[summary], f"GRA under the {judge}, {pct} % labeled, "
                                                          f"{run['noise']} human noise, {n} seeds", "DPO, human 100 %")
    return figures


def write_figures(figures, out_dir):
    """Write render_figures' SVGs into out_dir -> their paths."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in figures.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return [os.path.join(out_dir, name) for name in figures]


class NotFinite(Exception):
    """A number of results.json that no figure can draw."""


def not_finite(text):
    raise NotFinite(text)


def finite(text):
    """json's parse_float: a float, NaN-free and finite (1e999 parses as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(text)
    return value


def main(argv):
    """results.json -> its figures; a missing, truncated or malformed file is one line, and no figure written."""
    if len(argv) != 2:
        raise SystemExit(__doc__)
    try:
        with open(argv[0]) as f:
            figures = render_figures(json.load(f, parse_constant=not_finite, parse_float=finite))
        print("\n".join(write_figures(figures, argv[1])))
    except OSError as e:
        raise SystemExit(f"error: {e}")
    except NotFinite as e:
        raise SystemExit(f"error: {argv[0]}: {e} is not a finite number: a figure cannot draw it")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {argv[0]}: not valid JSON ({e})")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise SystemExit(f"error: {argv[0]}: not a results.json of eval.py (missing or malformed key: {e!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
