"""The README's Python example runs as written, and its CW-DPO loss equals the formula computed here
with math alone (a stale example, or a weighting that drifts from mean_i C_i * l_i, fails)."""
import math
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_runs_and_gives_the_cw_dpo_loss():
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README has one Python example"
    scope = {}
    exec(blocks[0], scope)

    beta = 0.1
    expected = []
    for a, b, c, r, rc, rr in zip(scope["score_a"].tolist(), scope["score_b"].tolist(),
                                  scope["chosen_logps"].tolist(), scope["rejected_logps"].tolist(),
                                  scope["ref_chosen_logps"].tolist(),
                                  scope["ref_rejected_logps"].tolist()):
        confidence = 2 * (1 / (1 + math.exp(-abs(a - b))) - 0.5)
        z = beta * ((c - rc) - (r - rr))
        expected.append(confidence * math.log1p(math.exp(-z)))  # C * -log sigmoid(z)
    assert abs(scope["loss"].item() - sum(expected) / len(expected)) < 1e-6
