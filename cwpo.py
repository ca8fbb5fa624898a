"""Confidence-Weighted Preference Optimization (CW-PO): the method in one module.

Paper: "When Weak LLMs Speak with Confidence, Preference Alignment Gets Stronger" (Afzali, Jeon,
Brbic; ICLR 2026; arXiv 2603.04968). Read in order: the weak labels (confidence, top_fraction_mask,
bt_loss); CW-PO (weighted_mean, batch_loss, win_rate); the pairwise losses, dispatched by
preference_loss and defined as TRL 1.16's trainers define them; sequence_logps, the one log-prob
function, and padded_logps, its plain equivalent; the fused LM-head kernel. Every function imports
only torch and math; each docstring says what else it needs to be copied. The batch layout is
data.collate's: one packed row, answers 0..B-1 the chosen and B..2B-1 the rejected ones.
"""
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target id < 0 marks a position that is not scored (log-prob 0, gradient 0)
# Rows of logits per chunk: [256, V] fp32 is 156 MB at V = 151,936; M = 256 keeps GEMMs efficient.
DEFAULT_CHUNK_SIZE = 256

# ----------------------------------------------------------------------------------- Weak labels

def confidence(score_a, score_b):
    """The weak label and its confidence (CW-PO's confidence score): a_wins = s_a >= s_b and
    C = 2 * (sigmoid(|s_a - s_b|) - 0.5) in [0, 1), the BT probability of the weak label rescaled.
      score_a, score_b  [B] the annotator's scores of answers a and b
    Returns (a_wins [B] bool, confidence [B] fp32).
    """
    score_a, score_b = score_a.float(), score_b.float()
    margin = (score_a - score_b).abs()
    return score_a >= score_b, 2.0 * (torch.sigmoid(margin) - 0.5)

def top_fraction_mask(confidences, fraction):
    """The paper's hard selection: 1.0 for the round(fraction * B) most confident pairs (at least
    one when fraction > 0), 0.0 for the others; ties keep the earlier pair.
      confidences  [B] the weak labels' confidence C
      fraction     float in [0, 1]
    Returns [B] float.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"top fraction must lie in [0, 1], got {fraction}")
    n = confidences.shape[0]
    keep = 0 if fraction == 0 else max(1, int(fraction * n + 0.5))
    order = torch.argsort(confidences, descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.float32, device=confidences.device)
    mask[order[:keep]] = 1.0
    return mask

def bt_loss(chosen_scores, rejected_scores, margin=None, center_coef=0.0):
    """Bradley-Terry loss per pair, the weak annotator's objective (InstructGPT Eq. 1):
    l = -log sigmoid(r+ - r- - margin) + center_coef * (r+ + r-)^2.
      chosen_scores, rejected_scores  [B] scalar rewards r+, r-
      margin       [B] or None, Llama 2's per-pair margin (Touvron et al. 2023, Eq. 2)
      center_coef  the reward-centering penalty of Eisenstein et al. 2023 (arXiv 2312.09244)
    Returns [B]; its mean is TRL RewardTrainer's loss (margin, center_rewards_coefficient).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff) + center_coef * (chosen_scores + rejected_scores) ** 2

# ----------------------------------------------------------------------------------- CW-PO

def weighted_mean(losses, weights, normalize="mean"):
    """CW-PO's objective: L = mean_i(w_i * l_i), w_i the annotator's confidence C_i (CW-PO), all
    ones (standard training) or a 0/1 top-N % mask.
      losses     [B] per-pair losses l_i
      weights    [B] per-pair weights w_i
      normalize  "mean": the mean above; "sum_w": sum_i(w_i l_i) / sum_i(w_i); "sum": the plain
                 sum, for a trainer that divides once over a batch split into micro-batches
    With "mean" a pair's weight is absolute (C = 0.1 moves the model 10x less than C = 1), and
    confidences averaging ~0.5 act like half the learning rate of DPO at w = 1; "sum_w" keeps only
    the relative weights, as hard selection does.
    """
    weighted = weights * losses
    if normalize == "mean":
        return weighted.mean()
    if normalize == "sum_w":  # an all-zero batch gives 0, not NaN
        return weighted.sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    if normalize == "sum":
        return weighted.sum()
    raise ValueError(f"unknown normalize {normalize!r}; known: mean, sum_w, sum")

def batch_loss(model, batch, ref_chosen_logps, ref_rejected_logps, loss_type="sigmoid", beta=0.1,
               normalize="mean", loss_weights=None, ld_alpha=None, use_weighting=False,
               chunk_size=DEFAULT_CHUNK_SIZE, **options):
    """Weighted preference loss of one batch in data.collate's layout: one forward of the policy.

      model               a model.GPT (called with return_hidden=True, layout=batch; .lm_head)
      batch               data.collate's dict; batch["weight"] [B] holds the CW-PO weights
      ref_chosen_logps    [B] the reference's summed answer log-probs (sequence_logps under
      ref_rejected_logps  no_grad, same ld_alpha), or None for a reference-free loss
      loss_type           a name of LOSS_TYPES, or a list of them combined as
                          sum_k loss_weights[k] * loss_k (TRL's loss_type list)
      ld_alpha            LD-DPO's weight of the answer tokens beyond the shorter answer's length
      use_weighting       WPO's per-pair factor w(y+) w(y-) (Zhou et al. 2024, Eq. 2; no gradient)
      normalize           how weighted_mean combines the weighted losses
      options             passed to preference_loss
    Returns (loss scalar, metrics dict of floats). aot / aot_unpaired sort pairs against each other,
    so they take no per-pair weights. Needs: sequence_logps, preference_loss, weighted_mean.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(loss_weights) != len(names):
        raise ValueError(f"{len(loss_weights)} loss_weights for {len(names)} loss types {names}")
    weights = batch["weight"]
    unequal = use_weighting or bool((weights != weights[0]).any())
    if {"aot", "aot_unpaired"} & set(names) and unequal:
        raise ValueError("aot / aot_unpaired sort pairs across the batch: per-pair weights "
                         "(CW-PO, top-N, WPO) cannot follow their pair; use equal weights")

    out = sequence_logps(model, batch, chunk_size, ld_alpha, use_weighting)
    chosen, rejected = out["logps"].chunk(2)  # [B] each
    n_chosen, n_rejected = out["n_tokens"].chunk(2)
    plain_chosen = out["summed_logps"][:len(chosen)]  # TRL's sft: the plain NLL, no LD weighting

    losses = 0.0
    for name, loss_weight in zip(names, loss_weights):
        loss = preference_loss(name, plain_chosen if name == "sft" else chosen, rejected,
                               ref_chosen_logps, ref_rejected_logps, beta,
                               chosen_n_tokens=n_chosen, rejected_n_tokens=n_rejected, **options)
        losses = losses + loss_weight * loss  # [B]
    if use_weighting:
        wpo_chosen, wpo_rejected = out["wpo_weights"].chunk(2)
        losses = losses * wpo_chosen * wpo_rejected
    loss = weighted_mean(losses, weights.to(losses.dtype), normalize)

    with torch.no_grad():  # DPO's implicit rewards beta * log(pi / pi_ref) (beta log pi without one)
        chosen_rewards = beta * (chosen - (0 if ref_chosen_logps is None else ref_chosen_logps))
        rejected_rewards = beta * (rejected - (0 if ref_rejected_logps is None else ref_rejected_logps))
        metrics = {"accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                   "margin": (chosen_rewards - rejected_rewards).mean().item(),
                   "chosen_reward": chosen_rewards.mean().item(),
                   "rejected_reward": rejected_rewards.mean().item()}
    return loss, metrics

def win_rate(policy_rewards, sft_rewards, n_boot=2000, seed=0):
    """Gold Reward Accuracy (GRA) in %: over held-out prompts, a gold judge's reward of the aligned
    policy's answer against the SFT model's, GRA = mean([policy > sft] + 0.5 [policy == sft]), with
    a bootstrap 95 % interval (percentiles of n_boot resampled means).
      policy_rewards  [P] the judge's score of the policy's answer to each prompt
      sft_rewards     [P] the judge's score of the SFT model's answer
    Returns {"gra", "lo", "hi"}.
    """
    policy = torch.as_tensor(policy_rewards).double()
    sft = torch.as_tensor(sft_rewards).double()
    wins = (policy > sft).double() + 0.5 * (policy == sft).double()  # [P]
    generator = torch.Generator().manual_seed(seed)
    resampled = torch.randint(len(wins), (n_boot, len(wins)), generator=generator)
    levels = torch.tensor([0.025, 0.975], dtype=torch.float64)
    lo, hi = torch.quantile(wins[resampled].mean(1), levels).tolist()
    return {"gra": 100 * wins.mean().item(), "lo": 100 * lo, "hi": 100 * hi}

# ----------------------------------------------------------------------------------- Pairwise losses
# Every argument below is a [B] tensor of one value per pair (or a float), every loss [B].
# Notation: u+ = log pi(y+|x) - log pi_ref(y+|x), u- likewise, s(u) the f-divergence score (u for
# DPO's reverse KL), delta = s(u+) - s(u-), n+- answer lengths. Conventions (lengths, batch-level
# means, label smoothing) are those of TRL 1.16's DPOTrainer / CPOTrainer / ORPOTrainer.

def f_divergence_score(logratios, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """f-DPO's implicit reward s(u) = f'(pi / pi_ref) (Wang et al. 2024, arXiv 2309.16240):
    reverse_kl: u;  forward_kl: 1 - exp(-u);  js_divergence: log 2 + log sigmoid(u);
    alpha_divergence: (exp((a - 1) u) - 1) / (a - 1), exponent clamped at 80 (as TRL), u for a = 1.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        return (torch.exp(((a - 1) * logratios).clamp(max=80.0)) - 1) / (a - 1)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; known: reverse_kl, "
                     "forward_kl, js_divergence, alpha_divergence")

def smoothed_sigmoid_loss(logits, label_smoothing=0.0):
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): DPO (Rafailov et al. 2023, Eq. 7) with
    z = beta * delta; e > 0 is the conservative cDPO of the original DPO code (Mitchell 2023),
    also CPO's, SimPO's and AOT's label smoothing."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)

def hinge_loss(delta, beta):
    """SLiC-HF's rank-calibration hinge (Zhao et al. 2023, arXiv 2305.10425):
    max(0, 1 - beta * delta)."""
    return torch.relu(1 - beta * delta)

def ipo_loss(chosen_scores, rejected_scores, chosen_n, rejected_n, beta):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), length-normalized as TRL:
    (s(u+) / n+ - s(u-) / n- - 1 / (2 beta))^2."""
    chosen = chosen_scores / chosen_n.clamp(min=1)
    rejected = rejected_scores / rejected_n.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2

def exo_pair_loss(delta, beta, label_smoothing):
    """EXO (Ji et al. 2024, arXiv 2402.00856, Eq. 16), KL(q || p) over {y+, y-} with
    q = softmax(beta * delta) and p = (1 - e, e):
    sigmoid(z) (log sigmoid(z) - log(1 - e)) + sigmoid(-z) (log sigmoid(-z) - log e)."""
    if label_smoothing <= 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    z = beta * delta
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
    rejected_term = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing))
    return chosen_term + rejected_term

def nca_pair_loss(chosen_logratios, rejected_logratios, beta):
    """NCA for one pair (Chen et al. 2024, arXiv 2402.05369), as TRL:
    -log sigmoid(beta u+) - 1/2 log sigmoid(-beta u+) - 1/2 log sigmoid(-beta u-)."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)

def robust_loss(delta, beta, label_smoothing):
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409), e the label-flip rate in [0, 0.5):
    (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e)."""
    e = label_smoothing
    if not 0 <= e < 0.5:  # e = 0.5 divides by 0; beyond, the loss rewards the rejected answer
        raise ValueError(f"robust needs label_smoothing (the flip rate) in [0, 0.5), got {e}")
    z = beta * delta
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)

def bco_pair_loss(chosen_logratios, rejected_logratios, beta):
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656), without the running reward shift, as
    TRL 1.16: -log sigmoid(beta u+) - log sigmoid(-beta u-)."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)

def sppo_hard_loss(chosen_logratios, rejected_logratios, beta):
    """SPPO (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7) with hard win probabilities 1 / 0:
    (u+ - 1 / (2 beta))^2 + (u- + 1 / (2 beta))^2."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2

def aot_loss(policy_margins, ref_margins, beta, label_smoothing=0.0):
    """AOT (Melnyk et al. 2024, arXiv 2406.05882): the smoothed DPO loss on sorted quantities,
    delta_k = sort(policy_margins)_k - sort(ref_margins)_k. Paired AOT: margins = log pi(y+) -
    log pi(y-) of policy and reference; unpaired: u+ and u-. The k-th loss belongs to no one pair."""
    delta = torch.sort(policy_margins).values - torch.sort(ref_margins).values
    return smoothed_sigmoid_loss(beta * delta, label_smoothing)

def apo_loss(chosen_logratios, rejected_logratios, beta, down=False):
    """APO (D'Oosterlinck et al. 2024, arXiv 2408.06266).
    apo_zero (Eq. 7): 1 - sigmoid(beta u+) + sigmoid(beta u-);
    apo_down (Eq. 8): sigmoid(beta u+) + 1 - sigmoid(beta (u+ - u-))."""
    if down:
        margin = chosen_logratios - rejected_logratios
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * margin)
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)

def discopop_loss(delta, beta, tau=0.05):
    """DiscoPOP (Lu et al. 2024, arXiv 2406.08414, Eq. 5), z = beta * delta, m = sigmoid(z / tau):
    (1 - m) (-log sigmoid(z)) + m exp(-z)."""
    z = beta * delta
    mix = torch.sigmoid(z / tau)
    return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)

def nll_loss(chosen_logps, chosen_n):
    """Token-level NLL of the chosen answers, spread over pairs: -log pi(y+_i) / mean_j(n+_j), so
    that the mean over the batch is -sum log p / (chosen tokens): TRL's "sft" loss, CPO's NLL."""
    return -chosen_logps / chosen_n.float().mean().clamp(min=1)

def simpo_loss(chosen_logps, rejected_logps, chosen_n, rejected_n, beta, simpo_gamma=0.5,
               label_smoothing=0.0):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), reference-free, with TRL CPO's label
    smoothing: z = beta (log pi(y+) / n+ - log pi(y-) / n-) - gamma, smoothed_sigmoid_loss(z)."""
    margin = chosen_logps / chosen_n.clamp(min=1) - rejected_logps / rejected_n.clamp(min=1)
    return smoothed_sigmoid_loss(beta * (margin - simpo_gamma / beta), label_smoothing)

def cpo_loss(chosen_logps, rejected_logps, chosen_n, beta, cpo_alpha=1.0, label_smoothing=0.0):
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 3 + NLL): reference-free (c)DPO plus
    cpo_alpha times the NLL of the chosen answers."""
    dpo = smoothed_sigmoid_loss(beta * (chosen_logps - rejected_logps), label_smoothing)
    return dpo + cpo_alpha * nll_loss(chosen_logps, chosen_n)

def orpo_loss(chosen_logps, rejected_logps, chosen_n, rejected_n, beta):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4 and 7), beta = lambda, on mean token
    log-probs l+- : NLL(y+) - beta * log sigmoid(log odds(y+) - log odds(y-)),
    log odds(y) = l - log(1 - exp(l)). The NLL is over the answer tokens (the paper's L_SFT);
    TRL's ORPOTrainer also counts the prompt tokens."""
    def log_odds(mean_logps):  # l - log(1 - e^l), log(1 - e^l) stable on both sides of -log 2
        log1mexp = torch.where(mean_logps < -math.log(2), torch.log1p(-torch.exp(mean_logps)),
                               torch.log(-torch.expm1(mean_logps)))
        return mean_logps - log1mexp

    chosen_mean = chosen_logps / chosen_n.clamp(min=1)
    rejected_mean = rejected_logps / rejected_n.clamp(min=1)
    ratio = F.logsigmoid(log_odds(chosen_mean) - log_odds(rejected_mean))
    return nll_loss(chosen_logps, chosen_n) - beta * ratio

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
              "simpo", "cpo", "orpo")
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "sft", "simpo", "cpo", "orpo")
# f-DPO keeps its meaning where the reward enters as the difference delta (TRL raises elsewhere)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")

def preference_loss(loss_type, chosen_logps, rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, beta=0.1, chosen_n_tokens=None,
                    rejected_n_tokens=None, label_smoothing=0.0, cdpo=0.0,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                    discopop_tau=0.05, simpo_gamma=0.5, cpo_alpha=1.0):
    """Per-pair loss of one LOSS_TYPES name, from summed answer log-probs of policy and reference.

      loss_type            a name of LOSS_TYPES ("sigmoid" is DPO, "robust" rDPO, "ipo" IPO)
      chosen_logps         [B] log pi(y+ | x), summed over the answer's tokens
      rejected_logps       [B] log pi(y- | x)
      ref_chosen_logps     [B] log pi_ref(y+ | x), or None for a reference-free loss (log pi_ref = 0)
      ref_rejected_logps   [B] log pi_ref(y- | x), or None
      beta                 the KL weight; ORPO's lambda for "orpo", the IPO tau for "ipo"
      chosen_n_tokens      [B] answer lengths n+, n-: needed by NEEDS_LENGTHS
      rejected_n_tokens    [B]
      label_smoothing      robust's flip rate; exo_pair, aot, aot_unpaired, simpo, cpo (as TRL)
      cdpo                 conservative DPO's label-flip rate for "sigmoid" (the original DPO code)
      f_divergence_type    f-DPO's score s(u) for F_DIVERGENCE_LOSSES, f_alpha_divergence_coef
      discopop_tau         DiscoPOP's temperature
      simpo_gamma          SimPO's target margin
      cpo_alpha            weight of CPO's NLL term ("cpo" is CPO's sigmoid loss)
    Returns [B]. Options are named as in TRL's DPOConfig / CPOConfig. Needs: torch, math, the loss
    functions above and the three name tuples beside it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} only applies to "
                         f"{', '.join(F_DIVERGENCE_LOSSES)}")
    n_chosen, n_rejected = chosen_n_tokens, rejected_n_tokens
    if loss_type in NEEDS_LENGTHS and (n_chosen is None or n_rejected is None):
        raise ValueError(f"loss {loss_type!r} needs chosen_n_tokens and rejected_n_tokens")

    # reference-free losses of log pi alone
    if loss_type == "sft":
        return nll_loss(chosen_logps, n_chosen)
    if loss_type == "simpo":
        return simpo_loss(chosen_logps, rejected_logps, n_chosen, n_rejected, beta, simpo_gamma,
                          label_smoothing)
    if loss_type == "cpo":
        return cpo_loss(chosen_logps, rejected_logps, n_chosen, beta, cpo_alpha, label_smoothing)
    if loss_type == "orpo":
        return orpo_loss(chosen_logps, rejected_logps, n_chosen, n_rejected, beta)

    # the log-ratios u = log pi - log pi_ref and their f-divergence scores s(u)
    ref_chosen = torch.zeros_like(chosen_logps) if ref_chosen_logps is None else ref_chosen_logps
    ref_rejected = torch.zeros_like(rejected_logps) if ref_rejected_logps is None else ref_rejected_logps
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    chosen_scores = f_divergence_score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores

    # losses of delta
    if loss_type == "sigmoid":
        return smoothed_sigmoid_loss(beta * delta, cdpo)
    if loss_type == "sigmoid_norm":  # DPO on length-normalized scores (TRL)
        normalized = chosen_scores / n_chosen.clamp(min=1) - rejected_scores / n_rejected.clamp(min=1)
        return -F.logsigmoid(beta * normalized)
    if loss_type == "hinge":
        return hinge_loss(delta, beta)
    if loss_type == "ipo":
        return ipo_loss(chosen_scores, rejected_scores, n_chosen, n_rejected, beta)
    if loss_type == "exo_pair":
        return exo_pair_loss(delta, beta, label_smoothing)
    if loss_type == "robust":
        return robust_loss(delta, beta, label_smoothing)
    if loss_type == "discopop":
        return discopop_loss(delta, beta, discopop_tau)

    # losses of u+ and u- apart
    if loss_type == "nca_pair":
        return nca_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "bco_pair":
        return bco_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type in ("apo_zero", "apo_down"):
        return apo_loss(chosen_logratios, rejected_logratios, beta, down=loss_type == "apo_down")

    # losses that sort pairs against each other
    if loss_type == "aot":
        return aot_loss(chosen_logps - rejected_logps, ref_chosen - ref_rejected, beta, label_smoothing)
    if loss_type == "aot_unpaired":
        return aot_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    raise ValueError(f"loss type {loss_type!r} has no branch here")  # every LOSS_TYPES name has one

# ----------------------------------------------------------------------------------- Log-probs

def sequence_logps(model, batch, chunk_size=DEFAULT_CHUNK_SIZE, ld_alpha=None, wpo=False):
    """Summed log-probs of each answer's tokens, with one forward of `model` over the packed row.

    Only the hidden states that predict an answer token (batch["score_index"]) go through the LM
    head, with the fused kernel (token_logps): prompt positions need no logits.
      model       a model.GPT: model(input_ids, return_hidden=True, layout=batch) -> [1, T, d],
                  and model.lm_head
      batch       data.collate's dict (input_ids, the layout, score_index / _target / _answer,
                  last_index)
      chunk_size  rows of logits the kernel holds at once
      ld_alpha    LD-DPO's weight of the tokens beyond the shorter answer (ld_weighted_logps)
      wpo         also return WPO's weights
    Returns a dict:
      "logps"         [A] fp32 sum_t log p(y_t | x, y_<t) per answer (A = 2B for pairs);
                      LD-weighted when ld_alpha is given (compute the reference the same way)
      "summed_logps"  [A] the plain sum, also with ld_alpha
      "token_logps"   [N] per scored token;  "answer" [N] its answer (batch["score_answer"])
      "n_tokens"      [A] answer tokens scored (a first token after an empty prompt is not)
      "wpo_weights"   [A] only with wpo=True: exp(mean_t(log p(y_t) - log sum_v p_v^2)), no
                      gradient (WPO, Zhou et al. 2024, Eq. 2)
    Needs: token_logps, ld_weighted_logps, token_log_sum_sq_probs and the kernel below.
    """
    hidden = model(batch["input_ids"], return_hidden=True, layout=batch)  # [1, T, d]
    hidden = hidden.flatten(0, 1)[batch["score_index"]]  # [N, d]
    lm_head = model.lm_head
    per_token = token_logps(hidden, lm_head.weight, batch["score_target"], lm_head.bias,
                            chunk_size)  # [N]

    answer = batch["score_answer"]  # [N]
    n_answers = len(batch["last_index"])
    n_tokens = torch.bincount(answer, minlength=n_answers)  # [A]
    summed = per_token.new_zeros(n_answers).index_add(0, answer, per_token)  # [A]
    logps = summed if ld_alpha is None else ld_weighted_logps(per_token, answer, n_tokens, ld_alpha)
    out = {"token_logps": per_token, "answer": answer, "n_tokens": n_tokens,
           "summed_logps": summed, "logps": logps}

    if wpo:
        log_sum_sq = token_log_sum_sq_probs(hidden.detach(), lm_head.weight.detach(), lm_head.bias,
                                            chunk_size)  # [N]
        log_ratio = per_token.new_zeros(n_answers).index_add(0, answer, per_token.detach() - log_sum_sq)
        out["wpo_weights"] = torch.exp(log_ratio / n_tokens.clamp(min=1))
    return out

def ld_weighted_logps(per_token_logps, answer, n_tokens, ld_alpha):
    """LD-DPO's length-desensitized log-prob (Liu et al. 2024, arXiv 2409.06411), TRL's ld_alpha:
    log p = sum of the first l_s answer tokens + ld_alpha * sum of the rest,
    l_s = min(len chosen, len rejected).
      per_token_logps  [N] grouped by answer in order
      answer           [N] their answers
      n_tokens         [2B] tokens per answer (:B chosen, B: rejected)
      ld_alpha         float
    Returns [2B]."""
    first = n_tokens.cumsum(0) - n_tokens  # [2B] where each answer's tokens start
    position = torch.arange(len(answer), device=answer.device) - first[answer] + 1  # [N] 1, 2, ...
    shared = torch.minimum(*n_tokens.chunk(2)).repeat(2)  # [2B] l_s of each answer's pair
    weighted = torch.where(position <= shared[answer], per_token_logps, ld_alpha * per_token_logps)
    return per_token_logps.new_zeros(len(n_tokens)).index_add(0, answer, weighted)

def padded_logps(logits, labels):
    """The plain, unfused per-answer log-prob (as the DPO repository's _get_batch_logps): copy this
    one alone. sequence_logps computes the same sums without padding or full logits.
      logits  [A, L, V] the model's logits on padded rows prompt + answer
      labels  [A, L] the row's token ids, IGNORE_INDEX (< 0) on prompt and padding positions
    Returns [A] fp32: sum over the answer tokens t of log softmax(logits[:, t - 1])[labels[:, t]].
    """
    labels = labels[:, 1:]  # position t - 1 predicts token t
    logps = logits[:, :-1].float().log_softmax(-1)  # [A, L - 1, V]
    per_token = logps.gather(2, labels.clamp(min=0)[:, :, None]).squeeze(2)  # [A, L - 1]
    return (per_token * (labels >= 0)).sum(-1)

# ----------------------------------------------------------------------------------- Fused kernel

def _acc_dtype(dtype):
    """Accumulation dtype: fp64 for fp64 inputs (exact tests), else fp32 (also for bf16 / fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32

def _chunk_logits(hidden, weight, bias):
    """Logits [n, V] of one chunk of hidden states [n, d] in the accumulation dtype (matmul in the
    inputs' dtype, as HF does; CPU has no bf16 x bf16 -> fp32 GEMM output)."""
    logits = hidden @ weight.t()  # [n, V]
    if bias is not None:
        logits += bias
    return logits.to(_acc_dtype(logits.dtype))

class FusedLogProbs(torch.autograd.Function):
    """logps[i] = log softmax(hidden[i] @ weight.T + bias)[targets[i]], never holding more than
    [chunk_size, V] logits.

    The naive version materializes logits [N, V], log-softmax [N, V] and their gradient [N, V] (at
    V = 151,936 and N = 4,096 that is 2.5 GB each in fp32). Here forward keeps, per row, only the
    logsumexp; backward recomputes the logits slice by slice of the vocabulary and turns them in
    place into d logp / d logits = grad * (onehot - softmax), then forms
    grad_weight[slice] = dlogits.T @ hidden in one GEMM and accumulates
    grad_hidden += dlogits @ W[slice] (fp32 arithmetic, also for bf16 / fp16 inputs; grads are
    returned in the inputs' dtype). Rows with targets < 0 give 0 and get 0 gradient.
      hidden [N, d], weight [V, d], bias [V] or None, targets [N] long, chunk_size int
    Output: [N] fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n_rows = hidden.shape[0]
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        acc = _acc_dtype(hidden.dtype)
        lse = torch.empty(n_rows, dtype=acc, device=hidden.device)  # [N] log sum_v exp(logit_v)
        target_logits = torch.empty(n_rows, dtype=acc, device=hidden.device)  # [N]

        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            logits = _chunk_logits(hidden[start:end], weight, bias)  # [n, V]
            target_logits[start:end] = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            row_max = logits.amax(dim=1)  # [n]
            # logsumexp in place: no second [n, V] temporary
            lse[start:end] = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            del logits

        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return (target_logits - lse).masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad = grad_logps.to(acc) * (targets >= 0)  # [N]; ignored rows get no gradient
        n_rows, vocab = hidden.shape[0], weight.shape[0]

        # Walk the vocabulary in slices of all N rows (as much memory as one forward chunk), so each
        # slice of grad_weight is one GEMM written once in the weight's dtype: no fp32 [V, d] buffer.
        width = max(1, ctx.chunk_size * vocab // max(n_rows, 1))
        hidden_acc = hidden.to(acc)  # [N, d], small beside [V, d]
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None

        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            # dlogits = grad * (onehot - softmax), built in place in the recomputed logits
            slice_bias = None if bias is None else bias[v0:v1]
            logits = _chunk_logits(hidden, weight[v0:v1], slice_bias)  # [N, v1 - v0]
            dlogits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # [N, v1 - v0]
            rows = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
            dlogits[rows, targets[rows] - v0] += grad[rows]

            if need_hidden:
                grad_hidden.addmm_(dlogits, weight[v0:v1].to(acc))  # [N, d]
            if need_weight and weight.dtype == acc:  # straight into the gradient, no temporary
                torch.mm(dlogits.t(), hidden_acc, out=grad_weight[v0:v1])  # [v1 - v0, d]
            elif need_weight:  # fp32 product, rounded once to the weight's dtype
                grad_weight[v0:v1] = dlogits.t() @ hidden_acc
            if need_bias:
                grad_bias[v0:v1] = dlogits.sum(dim=0).to(bias.dtype)
            del logits, dlogits

        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None

def token_logps(hidden, weight, targets, bias=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """Per-token log p(targets | hidden) via FusedLogProbs; targets < 0 give 0.
      hidden      [N, d] the hidden states that predict the targets
      weight      [V, d] the LM head;  bias [V] or None
      targets     [N] long token ids
      chunk_size  rows of logits held at once
    Returns [N] fp32 (fp64 for fp64 inputs). Under autocast the inputs are cast to the autocast
    dtype first and the kernel runs with autocast off, so that backward recomputes exactly the
    logits forward saw. Needs: FusedLogProbs, _chunk_logits, _acc_dtype.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logps: hidden is {hidden.dtype} but the LM head weight is {weight.dtype}")
    with torch.autocast(device_type, enabled=False):
        return FusedLogProbs.apply(hidden, weight, bias, targets, chunk_size)

@torch.no_grad()
def token_log_sum_sq_probs(hidden, weight, bias=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """log sum_v p_v^2 per row, chunked like FusedLogProbs, no gradient: WPO's sampling correction
    (Zhou et al. 2024, arXiv 2406.11827). log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z).
    hidden [N, d], weight [V, d], bias [V] or None -> [N] fp32."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = hidden[start:start + chunk_size]
        logits = _chunk_logits(chunk, weight, bias).float()  # [n, V]
        out[start:start + chunk_size] = (torch.logsumexp(2 * logits, dim=1)
                                         - 2 * torch.logsumexp(logits, dim=1))
    return out
