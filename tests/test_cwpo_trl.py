"""Parity of cwpo.py with TRL, computed through TRL's own trainers.

Tiny random Llama and GPT-2 checkpoints are written with transformers' save_pretrained and loaded on our side
with model.load_model. Each trainer (DPOTrainer, CPOTrainer, ORPOTrainer, RewardTrainer) is built from the same
folder, with a tokenizer made by the tokenizers library, on a handful of preference examples, in fp32 on CPU.
On one batch from the trainer's own collator, for every loss type and option:
  - our loss equals the trainer's compute_loss to 1e-5;
  - the gradients of a few parameter tensors (embedding, fused qkv, MLP, final norm, LM head / score head) agree
    to 1e-4 relative (Frobenius norm);
  - with confidence weights C (DPO losses, SimPO): the C-weighted mean of the trainer's one-example-at-a-time
    losses equals our weighted loss ("mean"), and their C-normalized sum our "sum_w".
Written against the versions pinned in requirements-test.txt (test_pinned_versions checks them).

TRL quirks found and how we handle them (each is tested below):
  - DPOTrainer "sft" (and CPO's NLL term) is a token-level mean over the whole batch, so it has no per-example
    decomposition: our per-pair form spreads it as -log pi(y+_i) / mean_j(n_j); its weighted version is checked
    against sum_i C_i n_i l_i / sum_j n_j built from TRL's one-example losses l_i.
  - "sft" ignores ld_alpha (plain token log-probs) while the pair losses use the LD-weighted sums: we match.
  - ipo / sigmoid_norm lengths: TRL counts completion_mask (unshifted), we count the scored (shifted) tokens; the
    two agree unless a row's answer starts at position 0 (an empty prompt without BOS).
  - aot / aot_unpaired sort pairs against each other: no per-pair weights (TRL refuses WPO for them; we refuse any
    unequal weights).
  - ORPOTrainer's NLL counts the prompt tokens too; we follow the ORPO paper (answer tokens only) and check the
    rest of the loss through ORPOTrainer (its loss minus its own NLL) and our NLL against a naive cross-entropy.
  - use_weighting (WPO) with "hinge": TRL multiplies the weights into relu's output in place, and its backward
    raises; for that case only the loss value is compared (and the raise is asserted, to notice a fix).
  - DPOTrainer's "sigmoid" ignores label_smoothing (no cDPO); ours is the separate option `cdpo`, tested in
    tests/test_cwpo.py against the formula, so label_smoothing keeps TRL's meaning in loss combinations.
  - transformers 5's TrainingArguments default to bf16=True even on CPU, which runs the prepared reference model
    under bf16 autocast (the policy is only prepared in train()): COMMON sets bf16=False for an fp32 comparison.
  - Reward score pooling: transformers' *ForSequenceClassification reads the score at the last token that is
    not pad_token_id; when the pad token is the EOS (GPT-2 style) that skips the EOS TRL appends to every answer.
    model.RewardModel reads it at the last attention_mask == 1 position (the EOS) on purpose; with pad != eos
    both agree, which is how the RewardTrainer parity runs.
"""

import pathlib
import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cwpo
import data
import model as our_model

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,  # noqa: E402
                          LlamaConfig, PreTrainedTokenizerFast)
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

# transformers 5 deprecates names (gradient_checkpointing) that TRL 1.16 still reads
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WORDS = [f"w{i}" for i in range(150)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
N_EXAMPLES = 6
COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
              per_device_train_batch_size=N_EXAMPLES, disable_tqdm=True, bf16=False)  # fp32 (bf16 is the default)


def test_pinned_versions():
    pins = dict(re.findall(r"^(\w+)==([\w.]+)", (pathlib.Path(__file__).parent.parent / "requirements-test.txt")
                           .read_text(), flags=re.M))
    assert transformers.__version__ == pins["transformers"] and trl.__version__ == pins["trl"]


def make_tokenizer(bos, pad_is_eos=False):
    """A word-level tokenizer over WORDS, wrapped for TRL; with bos, a post-processor prepends <s> (Llama style)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>" if pad_is_eos else "<pad>")


def preference_rows(seed=0):
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": words(2, 7), "chosen": " " + words(1, 6), "rejected": " " + words(1, 6),
             "margin": rng.uniform(-1, 1)} for _ in range(N_EXAMPLES)]


def hf_config(arch, **extra):
    """Tiny configs; initializer_range 0.3 makes the distributions peaked, so log-ratios are O(1), not ~0."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, **ids, **extra)
    return GPT2Config(vocab_size=len(SPECIALS) + len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      **ids, **extra)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def world(request, tmp_path_factory):
    """Policy and reference checkpoints (different random weights) of one architecture, loaded both ways."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    paths = {}
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(hf_config(arch)).save_pretrained(root / name)
        paths[name] = str(root / name)
    rows = preference_rows()
    return SimpleNamespace(
        arch=arch, root=root, policy_path=paths["policy"], ref_path=paths["ref"],
        tok=make_tokenizer(bos=arch == "llama"),  # GPT-2 style tokenizers add no BOS
        dataset=datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        rows=rows, ours=our_model.load_model(paths["policy"]), ours_ref=our_model.load_model(paths["ref"]))


def compared_params(ours):
    """(our name, HF names in the causal LM, transposed?) for a few tensors: embedding, fused qkv, MLP, norm, head."""
    cfg = ours.config
    names = ["wte.weight", "h.0.attn.qkv.weight", "h.1.mlp.down.weight", "ln_f.weight"]
    if ours.lm_head is not None and not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    out = []
    for name in names:
        theirs, transposed = our_model.hf_names(cfg, name)
        prefix = "" if name == "lm_head.weight" else our_model.PREFIXES[cfg.model_type]
        out.append((name, [prefix + n for n in theirs], transposed))
    return out


def assert_grads_close(ours, hf, rtol=1e-4):
    our_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name, theirs, transposed in compared_params(ours):
        hf_grad = torch.cat([hf_params[n].grad for n in theirs])
        hf_grad = hf_grad.t() if transposed else hf_grad
        our_grad = our_params[name].grad
        assert hf_grad.norm() > 0, name
        err = (our_grad - hf_grad).norm() / hf_grad.norm()
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


def our_batch(batch, weight=None):
    """TRL's rows (prompt + chosen rows, then prompt + rejected rows) -> the same pairs in data.collate's layout."""
    n_pairs = batch["input_ids"].shape[0] // 2
    parts = [(ids[(real == 1) & (answer == 0)].tolist(), ids[answer == 1].tolist())
             for ids, real, answer in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    assert all(parts[i][0] == parts[n_pairs + i][0] for i in range(n_pairs))  # a pair's two rows share the prompt
    pairs = [{"prompt_ids": parts[i][0], "chosen_ids": parts[i][1], "rejected_ids": parts[n_pairs + i][1]}
             for i in range(n_pairs)]
    batch = data.collate(pairs)
    batch["weight"] = torch.ones(n_pairs) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    return batch


def reward_batch(batch):
    """RewardTrainer's rows (chosen, then rejected) -> single sequences in data.collate's layout, scored at the
    last real token of each."""
    rows = [{"prompt_ids": ids[real == 1].tolist(), "answer_ids": []}
            for ids, real in zip(batch["input_ids"], batch["attention_mask"])]
    return data.collate(rows)


def loss_rtol(options):
    """Packed rows round fp32 log-probs differently from TRL's rows (~1e-7 relative): alpha-divergence IPO's
    exp((a - 1) u), of a policy far from its reference (losses near 300), magnifies that to ~1.5e-5."""
    return 5e-5 if options.get("loss_type") == "ipo" and options.get("f_divergence_type") == "alpha_divergence" else 1e-5


def our_ref_logps(world, batch, ld_alpha=None):
    with torch.no_grad():
        out = cwpo.sequence_logps(world.ours_ref, our_batch(batch), ld_alpha=ld_alpha)
    return out["logps"].chunk(2)


def confidences(n=N_EXAMPLES):
    return torch.rand(n, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------------
# DPOTrainer: every loss type and option. Each case is passed unchanged as DPOConfig fields and as our options.

DPO_CASES = {
    "sigmoid": {},
    "sigmoid_beta": {"beta": 0.5},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": "nca_pair"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.2},
    "bco_pair": {"loss_type": "bco_pair"},
    "sppo_hard": {"loss_type": "sppo_hard"},
    "aot": {"loss_type": "aot", "label_smoothing": 0.1},
    "aot_unpaired": {"loss_type": "aot_unpaired"},
    "apo_zero": {"loss_type": "apo_zero"},
    "apo_down": {"loss_type": "apo_down"},
    "discopop": {"loss_type": "discopop", "discopop_tau": 0.3},
    "sft": {"loss_type": "sft"},
    "sigmoid_norm": {"loss_type": "sigmoid_norm"},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "js_divergence": {"f_divergence_type": "js_divergence"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "alpha_divergence_ipo": {"loss_type": "ipo", "f_divergence_type": "alpha_divergence"},
    "js_divergence_robust": {"loss_type": "robust", "label_smoothing": 0.1, "f_divergence_type": "js_divergence"},
    "ld_alpha": {"ld_alpha": 0.3},
    "ld_alpha_ipo": {"loss_type": "ipo", "ld_alpha": 0.6},
    "wpo": {"use_weighting": True},
    "wpo_ipo": {"loss_type": "ipo", "use_weighting": True},
    "wpo_hinge": {"loss_type": "hinge", "use_weighting": True},
    "combination": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "combination_ld_alpha": {"loss_type": ["robust", "sft"], "label_smoothing": 0.1, "ld_alpha": 0.5},
}


# TRL multiplies the WPO weights into the hinge loss in place (`per_sequence_loss *= ...` on relu's output, which
# relu's backward needs): its backward raises, so for these cases only the loss value is compared with TRL.
TRL_BACKWARD_FAILS = {"wpo_hinge"}


def dpo_trainer(world, tmp_path, case):
    args = DPOConfig(output_dir=str(tmp_path), **COMMON, **case)
    ref = AutoModelForCausalLM.from_pretrained(world.ref_path, dtype=torch.float32)
    return DPOTrainer(model=world.policy_path, ref_model=ref, args=args, train_dataset=world.dataset,
                      processing_class=world.tok)


def collate(trainer, indices=range(N_EXAMPLES)):
    return trainer.data_collator([trainer.train_dataset[i] for i in indices])


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_loss_and_grads_match_trl(world, tmp_path, case):
    options = DPO_CASES[case]
    trainer = dpo_trainer(world, tmp_path, options)
    batch = collate(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    world.ours.zero_grad(set_to_none=True)
    ref_chosen, ref_rejected = our_ref_logps(world, batch, options.get("ld_alpha"))
    loss, metrics = cwpo.batch_loss(world.ours, our_batch(batch), ref_chosen, ref_rejected, **options)
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=loss_rtol(options), atol=1e-5)
    loss.backward()
    if case in TRL_BACKWARD_FAILS:
        with pytest.raises(RuntimeError, match="inplace"):  # if TRL fixes it, compare the gradients here too
            trl_loss.backward()
    else:
        trl_loss.backward()
        assert_grads_close(world.ours, trainer.model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert metrics["accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)
    assert metrics["margin"] == pytest.approx(trl_metrics["rewards/margins"], rel=1e-4, abs=1e-5)


# aot sorts pairs against each other: no per-pair decomposition, see test_aot_refuses_unequal_weights
WEIGHTED_DPO_CASES = [c for c in DPO_CASES if "aot" not in c and "sft" not in str(DPO_CASES[c].get("loss_type"))]


@pytest.mark.parametrize("case", WEIGHTED_DPO_CASES)
def test_confidence_weighted_dpo_matches_trl_one_example_at_a_time(world, tmp_path, case):
    options = DPO_CASES[case]
    trainer = dpo_trainer(world, tmp_path, options)
    with torch.no_grad():
        per_example = torch.stack([trainer.compute_loss(trainer.model, collate(trainer, [i]))
                                   for i in range(N_EXAMPLES)])
        weights = confidences()
        batch = collate(trainer)
        ref_chosen, ref_rejected = our_ref_logps(world, batch, options.get("ld_alpha"))
        loss, _ = cwpo.batch_loss(world.ours, our_batch(batch, weights), ref_chosen, ref_rejected, **options)
        torch.testing.assert_close(loss, (weights * per_example).mean(), rtol=loss_rtol(options), atol=1e-5)
        loss_sum_w, _ = cwpo.batch_loss(world.ours, our_batch(batch, weights), ref_chosen, ref_rejected,
                                        normalize="sum_w", **options)
        torch.testing.assert_close(loss_sum_w, (weights * per_example).sum() / weights.sum(), rtol=loss_rtol(options),
                                   atol=1e-5)


def test_confidence_weighted_sft_is_token_weighted(world, tmp_path):
    """TRL's "sft" is a token-level mean over the batch. From TRL's one-example losses l_i = -log pi(y+_i) / n_i,
    the C-weighted version of that batch mean is sum_i C_i n_i l_i / sum_j n_j."""
    trainer = dpo_trainer(world, tmp_path, {"loss_type": "sft"})
    with torch.no_grad():
        per_example = torch.stack([trainer.compute_loss(trainer.model, collate(trainer, [i]))
                                   for i in range(N_EXAMPLES)])
        batch = collate(trainer)
        n_chosen = batch["completion_mask"][:N_EXAMPLES, 1:].sum(dim=1).float()
        weights = confidences()
        loss, _ = cwpo.batch_loss(world.ours, our_batch(batch, weights), None, None, loss_type="sft")
    torch.testing.assert_close(loss, (weights * n_chosen * per_example).sum() / n_chosen.sum(), rtol=1e-5, atol=1e-5)


def test_aot_refuses_unequal_weights(world, tmp_path):
    trainer = dpo_trainer(world, tmp_path, {"loss_type": "aot"})
    batch = collate(trainer)
    ref_chosen, ref_rejected = our_ref_logps(world, batch)
    with pytest.raises(ValueError, match="aot"):
        cwpo.batch_loss(world.ours, our_batch(batch, confidences()), ref_chosen, ref_rejected, loss_type="aot")
    # equal weights w scale TRL's loss by w
    loss, _ = cwpo.batch_loss(world.ours, our_batch(batch, torch.full((N_EXAMPLES,), 0.5)), ref_chosen,
                              ref_rejected, loss_type="aot")
    torch.testing.assert_close(loss, 0.5 * trainer.compute_loss(trainer.model, batch).detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# CPOTrainer (simpo, CPO's sigmoid / hinge / ipo with the NLL term) and ORPOTrainer (trl.experimental)

CPO_CASES = {  # name: (CPOConfig fields, our options)
    "simpo": ({"loss_type": "simpo", "cpo_alpha": 0.0}, {"loss_type": "simpo"}),
    "simpo_smoothed": ({"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.2, "label_smoothing": 0.1,
                        "beta": 1.5}, {"loss_type": "simpo", "simpo_gamma": 0.2, "label_smoothing": 0.1, "beta": 1.5}),
    "cpo_simpo": ({"loss_type": "simpo", "cpo_alpha": 0.5},
                  {"loss_type": ["simpo", "sft"], "loss_weights": [1.0, 0.5]}),
    "cpo": ({"loss_type": "sigmoid"}, {"loss_type": "cpo"}),
    "cpo_smoothed": ({"loss_type": "sigmoid", "cpo_alpha": 0.7, "label_smoothing": 0.2},
                     {"loss_type": "cpo", "cpo_alpha": 0.7, "label_smoothing": 0.2}),
    "cpo_hinge": ({"loss_type": "hinge"}, {"loss_type": ["hinge", "sft"]}),
    "cpo_ipo": ({"loss_type": "ipo", "cpo_alpha": 0.3}, {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.3]}),
}


def concatenated(trainer, batch):
    """CPO / ORPO batches -> our layout (rows: chosen then rejected; labels -100 off the answer)."""
    cat = trainer.concatenated_inputs(batch, padding_value=trainer.processing_class.pad_token_id)
    return {"input_ids": cat["concatenated_input_ids"], "attention_mask": cat["concatenated_attention_mask"],
            "completion_mask": (cat["concatenated_labels"] != -100).long()}


def experimental_trainer(world, tmp_path, trainer_cls, config_cls, fields):
    args = config_cls(output_dir=str(tmp_path), max_length=64, remove_unused_columns=False, **COMMON, **fields)
    model = AutoModelForCausalLM.from_pretrained(world.policy_path, dtype=torch.float32)
    return trainer_cls(model=model, args=args, train_dataset=world.dataset, processing_class=world.tok)


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_loss_and_grads_match_trl(world, tmp_path, case):
    fields, options = CPO_CASES[case]
    trainer = experimental_trainer(world, tmp_path, CPOTrainer, CPOConfig, fields)
    batch = collate(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    world.ours.zero_grad(set_to_none=True)
    loss, _ = cwpo.batch_loss(world.ours, our_batch(concatenated(trainer, batch)), None, None, **options)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(world.ours, trainer.model)


def test_confidence_weighted_simpo_matches_trl_one_example_at_a_time(world, tmp_path):
    fields, options = CPO_CASES["simpo_smoothed"]
    trainer = experimental_trainer(world, tmp_path, CPOTrainer, CPOConfig, fields)
    with torch.no_grad():
        per_example = torch.stack([trainer.compute_loss(trainer.model, collate(trainer, [i]))
                                   for i in range(N_EXAMPLES)])
        weights = confidences()
        batch = our_batch(concatenated(trainer, collate(trainer)), weights)
        loss, _ = cwpo.batch_loss(world.ours, batch, None, None, **options)
    torch.testing.assert_close(loss, (weights * per_example).mean(), rtol=1e-5, atol=1e-5)


def naive_answer_nll(hf_model, batch):
    """Token-level mean cross-entropy of the chosen answers, from full transformers logits."""
    n_pairs = batch["input_ids"].shape[0] // 2
    logits = hf_model(input_ids=batch["input_ids"][:n_pairs], attention_mask=batch["attention_mask"][:n_pairs]).logits
    labels = batch["input_ids"][:n_pairs].masked_fill(batch["completion_mask"][:n_pairs] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_orpo_matches_trl_with_answer_only_nll(world, tmp_path, beta):
    """Our ORPO = ORPOTrainer's loss - its prompt+answer NLL + the answer-only NLL of the ORPO paper."""
    trainer = experimental_trainer(world, tmp_path, ORPOTrainer, ORPOConfig, {"beta": beta})
    batch = collate(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_full_nll = trainer.concatenated_forward(trainer.model, batch)[4]
    layout = concatenated(trainer, batch)
    expected = trl_loss - trl_full_nll + naive_answer_nll(trainer.model, layout)
    expected.backward()
    world.ours.zero_grad(set_to_none=True)
    loss, _ = cwpo.batch_loss(world.ours, our_batch(layout), None, None, loss_type="orpo", beta=beta)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(world.ours, trainer.model)
    assert (trl_full_nll - naive_answer_nll(trainer.model, layout)).abs() > 1e-3  # the difference is real


# ---------------------------------------------------------------------------------------------------
# RewardTrainer: Bradley-Terry loss with margin and reward centering, and where the score is read

REWARD_CASES = {"bt": {}, "margin": {"margin": True}, "center": {"center_rewards_coefficient": 0.05},
                "margin_center": {"margin": True, "center_rewards_coefficient": 0.2}}


@pytest.fixture(scope="module")
def reward_world(world):
    torch.manual_seed(2)
    path = world.root / "reward"
    AutoModelForSequenceClassification.from_config(hf_config(world.arch, num_labels=1)).save_pretrained(path)
    return SimpleNamespace(path=str(path), ours=our_model.load_model(str(path), reward=True))


def reward_trainer(world, reward_world, tmp_path, fields, tok):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
             **({"margin": r["margin"]} if fields.get("margin") else {})} for r in world.rows]
    args = RewardConfig(output_dir=str(tmp_path), **COMMON,
                        center_rewards_coefficient=fields.get("center_rewards_coefficient"))
    model = AutoModelForSequenceClassification.from_pretrained(reward_world.path, dtype=torch.float32)
    return RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


@pytest.mark.parametrize("case", list(REWARD_CASES))
def test_bt_loss_matches_reward_trainer(world, reward_world, tmp_path, case):
    fields = REWARD_CASES[case]
    trainer = reward_trainer(world, reward_world, tmp_path, fields, world.tok)  # pad != eos: same pooling
    batch = collate(trainer)
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    reward_world.ours.zero_grad(set_to_none=True)
    layout = reward_batch(batch)
    chosen, rejected = reward_world.ours(layout["input_ids"], layout=layout).chunk(2)
    losses = cwpo.bt_loss(chosen, rejected, batch.get("margin"), fields.get("center_rewards_coefficient") or 0.0)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), trl_loss.detach(), rtol=1e-5, atol=1e-5)
    our_params, hf_params = dict(reward_world.ours.named_parameters()), dict(trainer.model.named_parameters())
    for name, theirs, transposed in compared_params(reward_world.ours.body) + [("score.weight", ["score.weight"],
                                                                               False)]:
        hf_grad = torch.cat([hf_params[n].grad for n in theirs])
        hf_grad = hf_grad.t() if transposed else hf_grad
        our_name = name if name == "score.weight" else "body." + name
        err = (our_params[our_name].grad - hf_grad).norm() / hf_grad.norm()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_reward_pooling_when_pad_is_eos(world, reward_world, tmp_path):
    """pad == eos: transformers pools at the last non-pad token, i.e. the token before the trailing EOS;
    RewardModel pools at the EOS itself (the last attention_mask == 1 position), deliberately."""
    trainer = reward_trainer(world, reward_world, tmp_path, {}, make_tokenizer(bos=world.arch == "llama",
                                                                                pad_is_eos=True))
    batch = collate(trainer)
    with torch.no_grad():
        hf = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        layout = reward_batch(batch)
        ours = reward_world.ours(layout["input_ids"], layout=layout)
        last = batch["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(len(last))
        assert (batch["input_ids"][rows, last] == trainer.processing_class.eos_token_id).all()
        scores = trainer.model.score(hf.hidden_states[-1])[..., 0]  # [R, T] score at every position
    torch.testing.assert_close(ours, scores[rows, last], rtol=1e-5, atol=1e-5)  # ours: at the EOS
    torch.testing.assert_close(hf.logits[:, 0], scores[rows, last - 1], rtol=1e-5, atol=1e-5)  # HF: the one before


# --- issue 10: weights, gradients, autocast
# f-divergences and options beyond the cases above, all accepted by TRL 1.16's DPOTrainer (f-DPO is allowed for
# sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft; WPO for every loss but aot / aot_unpaired).
# The log 2 of js_divergence cancels in delta = s(u+) - s(u-) but not in the length-normalized ipo / sigmoid_norm.

MORE_DPO_CASES = {
    "js_divergence_ipo": {"loss_type": "ipo", "beta": 0.5, "f_divergence_type": "js_divergence"},
    "js_divergence_sigmoid_norm": {"loss_type": "sigmoid_norm", "f_divergence_type": "js_divergence"},
    "alpha_divergence_sigmoid_norm": {"loss_type": "sigmoid_norm", "f_divergence_type": "alpha_divergence",
                                      "f_alpha_divergence_coef": 0.3},
    "alpha_divergence_ipo_coef": {"loss_type": "ipo", "f_divergence_type": "alpha_divergence",
                                  "f_alpha_divergence_coef": 1.7},
    "alpha_divergence_coef_1": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    "forward_kl_hinge": {"loss_type": "hinge", "beta": 0.5, "f_divergence_type": "forward_kl"},
    "forward_kl_exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-2, "f_divergence_type": "forward_kl"},
    "forward_kl_discopop": {"loss_type": "discopop", "discopop_tau": 0.3, "f_divergence_type": "forward_kl"},
    "aot_unpaired_smoothed": {"loss_type": "aot_unpaired", "label_smoothing": 0.2},
    "wpo_combination": {"loss_type": ["sigmoid", "bco_pair", "ipo"], "loss_weights": [0.7, 0.3, 0.05],
                        "use_weighting": True},
}


@pytest.mark.parametrize("case", list(MORE_DPO_CASES))
def test_more_dpo_options_match_trl(world, tmp_path, case):
    """Loss and gradients against DPOTrainer on the batch, then (except for aot) the C-weighted loss against
    TRL's one-example losses, as test_dpo_loss_and_grads_match_trl and the weighted test above."""
    options = MORE_DPO_CASES[case]
    trainer = dpo_trainer(world, tmp_path, options)
    batch = collate(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    world.ours.zero_grad(set_to_none=True)
    ref_chosen, ref_rejected = our_ref_logps(world, batch)
    loss, _ = cwpo.batch_loss(world.ours, our_batch(batch), ref_chosen, ref_rejected, **options)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=loss_rtol(options), atol=1e-5)
    assert_grads_close(world.ours, trainer.model)
    if "aot" in case:
        return
    with torch.no_grad():
        per_example = torch.stack([trainer.compute_loss(trainer.model, collate(trainer, [i]))
                                   for i in range(N_EXAMPLES)])
        weights = confidences()
        loss, _ = cwpo.batch_loss(world.ours, our_batch(batch, weights), ref_chosen, ref_rejected, **options)
    torch.testing.assert_close(loss, (weights * per_example).mean(), rtol=1e-5, atol=1e-5)


# Weighted gradients: d mean_i(C_i l_i) = sum_i C_i d l_i / B, built from TRL's one-example backward passes, and the
# same for "sum_w" with sum_i C_i in place of B. The value tests above run under no_grad and cannot see a weight
# that reaches the loss but not its gradient (a detached weight, a weight applied to a logged copy).

def trl_weighted_grads(trainer, term):
    """Backward of term(i, batch of example i) for every example into trainer.model's .grad -> sum of the terms."""
    trainer.model.zero_grad(set_to_none=True)
    terms = [term(i, collate(trainer, [i])) for i in range(N_EXAMPLES)]
    for t in terms:
        t.backward()
    return torch.stack(terms).detach().sum()


def scale_grads(model, factor):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


@pytest.mark.parametrize("case", ["sigmoid", "ipo", "robust", "js_divergence_robust", "wpo_ipo"])
def test_confidence_weighted_dpo_gradients_match_trl(world, tmp_path, case):
    options = DPO_CASES[case]
    trainer = dpo_trainer(world, tmp_path, options)
    weights = confidences()
    trl_weighted_grads(trainer, lambda i, b: weights[i] / N_EXAMPLES * trainer.compute_loss(trainer.model, b))
    batch = collate(trainer)
    ref_chosen, ref_rejected = our_ref_logps(world, batch, options.get("ld_alpha"))
    for normalize in ("mean", "sum_w"):
        world.ours.zero_grad(set_to_none=True)
        loss, _ = cwpo.batch_loss(world.ours, our_batch(batch, weights), ref_chosen, ref_rejected,
                                  normalize=normalize, **options)
        loss.backward()
        if normalize == "sum_w":
            scale_grads(trainer.model, N_EXAMPLES / weights.sum().item())
        assert_grads_close(world.ours, trainer.model)


def test_confidence_weighted_cpo_matches_trl_values_and_gradients(world, tmp_path):
    """CPO = (c)DPO without reference + alpha * NLL, where TRL's NLL is a token-level mean over the batch. From TRL's
    one-example loss l_i and NLL m_i (its concatenated_forward): s_i = l_i - alpha m_i, and the C-weighted batch
    loss is sum_i C_i s_i / B + alpha sum_i C_i n_i m_i / sum_j n_j (n_i the chosen answer's scored tokens)."""
    fields, options = CPO_CASES["cpo_smoothed"]
    alpha = fields["cpo_alpha"]
    trainer = experimental_trainer(world, tmp_path, CPOTrainer, CPOConfig, fields)
    layout = concatenated(trainer, collate(trainer))
    n = layout["completion_mask"][:N_EXAMPLES, 1:].sum(dim=1).float()
    weights = confidences()

    def weighted_example(i, b):  # C_i s_i / B + alpha C_i n_i m_i / sum n, with s_i = l_i - alpha m_i
        loss, nll = trainer.compute_loss(trainer.model, b), trainer.concatenated_forward(trainer.model, b)[4]
        return weights[i] * ((loss - alpha * nll) / N_EXAMPLES + alpha * n[i] / n.sum() * nll)
    expected = trl_weighted_grads(trainer, weighted_example)
    world.ours.zero_grad(set_to_none=True)
    loss, _ = cwpo.batch_loss(world.ours, our_batch(layout, weights), None, None, **options)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(world.ours, trainer.model)


def test_confidence_weighted_orpo_matches_trl_values_and_gradients(world, tmp_path):
    """ORPO = answer-only NLL - beta log sigmoid(log odds ratio). From TRL's one-example loss l_i and its
    prompt+answer NLL f_i: r_i = l_i - f_i; with a_i the answer-only NLL (naive cross-entropy), the C-weighted
    batch loss is sum_i C_i r_i / B + sum_i C_i n_i a_i / sum_j n_j."""
    trainer = experimental_trainer(world, tmp_path, ORPOTrainer, ORPOConfig, {"beta": 0.8})
    layout = concatenated(trainer, collate(trainer))
    n = layout["completion_mask"][:N_EXAMPLES, 1:].sum(dim=1).float()
    weights = confidences()

    def weighted_example(i, b):  # C_i r_i / B + C_i n_i a_i / sum n, with r_i = l_i - f_i
        ratio = trainer.compute_loss(trainer.model, b) - trainer.concatenated_forward(trainer.model, b)[4]
        answer_nll = naive_answer_nll(trainer.model, concatenated(trainer, b))
        return weights[i] * (ratio / N_EXAMPLES + n[i] / n.sum() * answer_nll)
    expected = trl_weighted_grads(trainer, weighted_example)
    world.ours.zero_grad(set_to_none=True)
    loss, _ = cwpo.batch_loss(world.ours, our_batch(layout, weights), None, None, loss_type="orpo", beta=0.8)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(world.ours, trainer.model)
