"""Run the tests from the repository root's modules (model, cwpo, data, ...), never an installed copy."""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads make 2-core runs erratic
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.manual_seed(0)


import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tokenizer, a tiny random Llama-style checkpoint and a pairs file from world.py's world (gold-labeled)."""
    import world
    from model import GPT, config_from_hf, save_model
    root = tmp_path_factory.mktemp("tiny_world")
    rng = random.Random(0)
    prompts = world.world_prompts(48, seed=0)
    pairs = []
    for p in prompts:
        a, b = world.world_answer(p, rng), world.world_answer(p, rng)
        good, bad = (a, b) if world.gold_reward(p, a) >= world.gold_reward(p, b) else (b, a)
        pairs.append({"prompt": p, "chosen": good, "rejected": bad, "confidence": rng.random()})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ckpt = root / "model"
    tok = world.train_tokenizer([p["prompt"] + p["chosen"] + p["rejected"] for p in pairs], 400, str(ckpt))
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    save_model(GPT(config_from_hf(hf)).init_weights(), str(ckpt))
    return {"model": str(ckpt), "pairs": str(root / "pairs.jsonl"), "root": root}


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A byte-level BPE tokenizer (300 ids) trained on world.py's text: the suite's tokenizer for encoding tests."""
    import world
    prompts = world.world_prompts(400, seed=0)
    rng = random.Random(0)
    texts = prompts + [world.world_answer(p, rng) for p in prompts]
    return world.train_tokenizer(texts, vocab_size=300, out_dir=str(tmp_path_factory.mktemp("tok")))
