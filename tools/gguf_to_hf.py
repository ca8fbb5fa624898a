"""Convert a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face folder that model.py and
transformers load: config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json.

    python tools/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf smollm2-135m

The GGUF layout (ggml's docs/gguf.md), little-endian throughout:

    header        magic b"GGUF", version u32 (2 or 3), tensor count u64, metadata count u64
    metadata      key (string), value type u32, value          string = byte length u64 + UTF-8 bytes
                  array value = element type u32, count u64, elements
    tensor infos  name (string), n_dims u32, dims u64[n_dims] (innermost first), ggml type u32, offset u64
    data          starts at the first multiple of `general.alignment` (default 32) after the tensor infos;
                  each tensor's offset is counted from there

Quantized types store blocks of 32 consecutive values of a row (see dequantize). Dequantized weights are
exactly what llama.cpp computes with, not the original weights (Q4_1 keeps about 5 bits per weight).
"""
import argparse
import json
import math
import os
import pathlib
import struct
import tempfile
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save_file

# metadata value types (gguf.md): fixed-size scalars by struct format; 8 = string, 9 = array
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
FLOAT32, STRING, ARRAY = 6, 8, 9

# ggml tensor types, named for error messages; BLOCKS gives (values per block, bytes per block) of the supported ones
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
              19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}

# llama.cpp's tensor names -> transformers' LlamaForCausalLM names; {i} is the layer
LLAMA_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight",
               "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
               "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
               "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
               "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
               "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
               "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
               "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
               "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
               "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # numpy order (outermost first): a [out, in] weight is stored with dims (in, out)
    ggml_type: str
    offset: int       # absolute position of the first byte in the file
    nbytes: int


@dataclass
class GGUF:
    path: str
    version: int
    metadata: dict
    tensors: dict     # name -> TensorInfo, in file order


class _Reader:
    """Sequential little-endian reads from a binary file; a short read is a truncated file."""

    def __init__(self, f, path):
        self.f, self.path, self.size = f, path, os.fstat(f.fileno()).st_size

    def check_left(self, n):  # a corrupt length (2^62) is refused before it is allocated
        if n > self.size - self.f.tell():
            raise ValueError(f"{self.path}: truncated at byte {self.f.tell()} (wanted {n} more bytes)")

    def bytes(self, n):
        self.check_left(n)
        return self.f.read(n)

    def scalar(self, fmt):
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt)))[0]

    def string(self):
        at = self.f.tell()
        try:
            return self.bytes(self.scalar("<Q")).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: the string at byte {at} is not UTF-8") from None

    def value(self, vtype, key):
        if vtype == FLOAT32:  # the shortest decimal that reads back as this float32: 1e-05, not 9.99999974e-06
            return float(str(np.float32(self.scalar("<f"))))
        if vtype in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            self.check_left(count)  # every element takes at least one byte
            if etype in SCALAR_FORMATS and etype != 7:  # numbers in one read
                fmt = SCALAR_FORMATS[etype]
                return np.frombuffer(self.bytes(count * struct.calcsize(fmt)), dtype=np.dtype(fmt)).tolist()
            return [self.value(etype, key) for _ in range(count)]
        raise ValueError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")


def read_gguf(path):
    """Parse the header, metadata and tensor infos of a GGUF file (no tensor data is read) -> GGUF."""
    with open(path, "rb") as f:
        r = _Reader(f, path)
        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"), key)
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
            type_id, offset = r.scalar("<I"), r.scalar("<Q")
            infos.append((name, dims, GGML_TYPES.get(type_id, f"type {type_id}"), offset))
        alignment = metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment < 1:
            raise ValueError(f"{path}: metadata key 'general.alignment' must be a positive integer, got {alignment!r}")
        data_start = -(-f.tell() // alignment) * alignment
        size = r.size
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        count = math.prod(dims)  # Python integers: a corrupt dimension cannot overflow into a small count
        block, block_bytes = BLOCKS.get(ggml_type, (1, 0))  # an unsupported type is reported when it is read
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
                             f"{ggml_type} block size {block}")
        nbytes = count // block * block_bytes
        if data_start + offset + nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, data_start + offset, nbytes)
    return GGUF(path, version, metadata, tensors)


def dequantize(raw, ggml_type):
    """Bytes of consecutive blocks (uint8 [n]) -> float32 values. Block layouts (ggml-common.h), 32 values each:

        Q8_0  d f16 | q int8[32]                     x[j] = d * q[j]
        Q4_0  d f16 | qs uint8[16]                   x[j] = d * ((qs[j] & 0xF) - 8),  x[j + 16] = d * ((qs[j] >> 4) - 8)
        Q4_1  d f16 | m f16 | qs uint8[16]           x[j] = d * (qs[j] & 0xF) + m,    x[j + 16] = d * (qs[j] >> 4) + m

    (low nibbles give the first half of the block, high nibbles the second). F32 and F16 are plain arrays.
    """
    if ggml_type == "F32":
        return raw.view("<f4").astype(np.float32)
    if ggml_type == "F16":
        return raw.view("<f2").astype(np.float32)
    if ggml_type not in BLOCKS:
        raise ValueError(f"ggml type {ggml_type} is not supported (only {', '.join(BLOCKS)})")
    blocks = raw.reshape(-1, BLOCKS[ggml_type][1])
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    if ggml_type == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8)).ravel()
    qs = blocks[:, 4:] if ggml_type == "Q4_1" else blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # [n_blocks, 32]
    if ggml_type == "Q4_0":
        return (d * (q - 8)).ravel()
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (d * q + m).ravel()


def read_tensor(gguf, name):
    """One tensor, dequantized to float32, in numpy order (a weight [out, in])."""
    info = gguf.tensors[name]
    if info.ggml_type not in BLOCKS:
        raise ValueError(f"{gguf.path}: tensor {name!r} has ggml type {info.ggml_type}, which is not supported "
                         f"(only {', '.join(BLOCKS)})")
    raw = np.fromfile(gguf.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    return dequantize(raw, info.ggml_type).reshape(info.shape)


def unpermute(w, n_head):
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`).

    transformers applies rotary embeddings by halves: rotated pairs are rows (j, j + hd/2) of each head.
    llama.cpp rotates adjacent rows (2j, 2j + 1), so the converter interleaves the halves of each head:
    GGUF row 2j + s of a head is HF row s * hd/2 + j. Here: [n_head, hd/2, 2, in] -> [n_head, 2, hd/2, in].
    For K, n_head is the number of key/value heads.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _key(gguf, key, default=None):
    if key in gguf.metadata:
        return gguf.metadata[key]
    if default is None:
        raise ValueError(f"{gguf.path}: metadata key {key!r} is missing")
    return default


def llama_config(gguf):
    """transformers' LlamaConfig fields (config.json) from the `llama.*` and tokenizer metadata."""
    arch = _key(gguf, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: architecture {arch!r} is not supported (only 'llama', Mistral's included; "
                         "model.py loads Qwen2, Qwen3 and Mistral from their Hugging Face folders)")
    scaling = gguf.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in gguf.tensors:
        raise ValueError(f"{gguf.path}: RoPE scaling ({scaling!r}, or Llama 3.1's rope_freqs tensor) is not supported "
                         "here; model.py loads rope types 'llama3' and 'yarn' from a Hugging Face folder")
    d, n_head = _key(gguf, "llama.embedding_length"), _key(gguf, "llama.attention.head_count")
    vocab = len(_key(gguf, "tokenizer.ggml.tokens"))
    special = {f"{kind}_token_id": gguf.metadata.get(f"tokenizer.ggml.{key}_token_id")
               for kind, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
            "intermediate_size": _key(gguf, "llama.feed_forward_length"),
            "num_hidden_layers": _key(gguf, "llama.block_count"), "num_attention_heads": n_head,
            "num_key_value_heads": _key(gguf, "llama.attention.head_count_kv", n_head),
            "head_dim": _key(gguf, "llama.attention.key_length", d // n_head),
            "max_position_embeddings": _key(gguf, "llama.context_length"),
            "rms_norm_eps": _key(gguf, "llama.attention.layer_norm_rms_epsilon"),
            "rope_theta": _key(gguf, "llama.rope.freq_base", 10000.0), "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "tie_word_embeddings": "output.weight" not in gguf.tensors, **special, "dtype": "float32"}


def hf_name(gguf_name):
    """llama.cpp tensor name -> transformers name (None if it has none), e.g.
    "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template = LLAMA_NAMES.get(".".join(["blk", "{i}"] + parts[2:]))
        return template.format(i=parts[1]) if template else None
    return LLAMA_NAMES.get(gguf_name)


def llama_state(gguf, config):
    """All tensors, dequantized to float32 under transformers' names, Q and K rows un-permuted."""
    unknown = [name for name in gguf.tensors if hf_name(name) is None]
    if unknown:
        raise ValueError(f"{gguf.path}: tensor {unknown[0]!r} has no Llama counterpart ({len(unknown)} unknown in all)")
    unsupported = [t for t in gguf.tensors.values() if t.ggml_type not in BLOCKS]
    if unsupported:
        raise ValueError(f"{gguf.path}: tensor {unsupported[0].name!r} has ggml type {unsupported[0].ggml_type}, "
                         f"which is not supported (only {', '.join(BLOCKS)})")
    state = {}
    for name in gguf.tensors:
        w = read_tensor(gguf, name)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        state[hf_name(name)] = np.ascontiguousarray(w)
    embed = state["model.embed_tokens.weight"].shape
    if embed != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"{gguf.path}: token_embd.weight has shape {embed}, metadata implies "
                         f"({config['vocab_size']}, {config['hidden_size']})")
    return state


def pre_tokenizer(gguf):
    """The pre-tokenizer tokenizer.ggml.pre names (llama.cpp's llama-vocab.cpp regexes, as tokenizers objects)."""
    from tokenizers import pre_tokenizers
    pre = gguf.metadata.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 split regex
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":  # digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"{gguf.path}: tokenizer.ggml.pre {pre!r} is not supported (only 'default', 'gpt2', 'smollm')")


def build_tokenizer(gguf):
    """A byte-level BPE tokenizers.Tokenizer from tokenizer.ggml.{tokens, merges, token_type} (gpt2 model only).

    Control tokens become special added tokens, user-defined ones plain added tokens (the reverse of what
    convert_hf_to_gguf.py does), so that "<|im_start|>" in a text maps to its single id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    model = _key(gguf, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gguf.path}: tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens, merges = _key(gguf, "tokenizer.ggml.tokens"), _key(gguf, "tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{gguf.path}: tokenizer.ggml.tokens has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer(gguf)
    tok.decoder = decoders.ByteLevel()
    types = gguf.metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = gguf.metadata.get("tokenizer.ggml.bos_token_id")
    if gguf.metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def tokenizer_config(gguf):
    """tokenizer_config.json: the special tokens by text, BOS/EOS flags, and the chat template when there is one."""
    tokens, meta = gguf.metadata["tokenizer.ggml.tokens"], gguf.metadata
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": meta.get("llama.context_length"),
           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None:
            out[f"{kind}_token"] = tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _atomic_write(path, write):
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's files are private (0600); a model folder is meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                    "merges.txt", "special_tokens_map.json")  # beside *.safetensors and model.safetensors.index.json


def earlier_checkpoint(out_dir):
    """The files of an earlier checkpoint in out_dir (weights, shards, index, config, tokenizer), sorted."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(n for n in names if n in CHECKPOINT_FILES or n.endswith((".safetensors", ".safetensors.index.json")))


def convert(gguf_path, out_dir, overwrite=False):
    """GGUF file -> Hugging Face folder. Everything is built in memory and checked before the first file is written.
    The folder is owned whole: an earlier checkpoint there stops the conversion, or with overwrite is removed first
    (a stale sharded index would be read instead of the converted weights)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: the output path exists and is not a folder")
    earlier = earlier_checkpoint(out_dir)
    if earlier and not overwrite:
        raise ValueError(f"{out_dir} holds an earlier checkpoint's {', '.join(earlier[:3])}: pass --overwrite to "
                         "replace it, or another folder")
    gguf = read_gguf(gguf_path)
    config = llama_config(gguf)
    tok = build_tokenizer(gguf)
    state = llama_state(gguf, config)
    for name in earlier:
        os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)

    def write_json(name, obj):
        text = json.dumps(obj, indent=2) + "\n"
        _atomic_write(os.path.join(out_dir, name), lambda tmp: pathlib.Path(tmp).write_text(text))

    _atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(state, tmp, {"format": "pt"}))
    _atomic_write(os.path.join(out_dir, "tokenizer.json"), tok.save)
    write_json("config.json", config)
    write_json("tokenizer_config.json", tokenizer_config(gguf))
    types = {}
    for t in gguf.tensors.values():
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    return {"layers": config["num_hidden_layers"], "parameters": sum(w.size for w in state.values()),
            "vocab_size": config["vocab_size"], "tensor_types": types}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="a Llama-architecture .gguf file (F32, F16, Q8_0, Q4_0 or Q4_1 tensors)")
    p.add_argument("out", help="output folder (created; an earlier checkpoint there needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="remove an earlier checkpoint's files from OUT first")
    args = p.parse_args()
    try:
        summary = convert(args.gguf, args.out, args.overwrite)
    except (ValueError, OSError) as e:  # bad input (a directory, a file in the output's place): one line
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
