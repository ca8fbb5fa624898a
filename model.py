"""A minimal decoder-only transformer that loads real Hugging Face checkpoints.

One module covers GPT-2, OPT, Qwen2 (2.5), Qwen3, Llama (3.x) and Mistral. It reads a local
folder (config.json + model.safetensors, possibly sharded), maps tensor names explicitly (one table
per family, below), and writes the same layout back so that transformers loads what we saved.

    model = load_model("opt-125m")                  # causal LM
    rm = load_model("opt-125m", reward=True)        # backbone + scalar head
    hidden = model(ids, mask, return_hidden=True)   # [B, T, d], LM head not applied
"""
import functools
import json
import math
import os
import pathlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from runs import atomic_write, check_config, clear_checkpoint, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}

# ----------------------------------------------------------------------------------- Config

@dataclass
class Config:
    """What the decoder needs of a config.json, in its own names (config_from_hf maps each family's)."""
    model_type: str
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int
    max_pos: int
    act: str
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    pre_norm: bool = True              # False only for OPT-350m style post-LN
    final_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    proj_dim: int = 0                  # OPT word_embed_proj_dim when != hidden_size
    qk_norm: bool = False              # Qwen3: each head's q and k RMS-normed before RoPE
    sliding_window: int = 0            # some layers attend within it (0: none); see check_fits
    rope_params: dict = field(default_factory=dict, repr=False)  # rope_type, factor, ...
    dtype: str = "float32"
    hf: dict = field(default_factory=dict, repr=False)  # the config.json it came from, saved back

    @property
    def rope(self):
        """Llama, Qwen2/3, Mistral: RoPE and RMSNorm; GPT-2, OPT: learned positions, LayerNorm."""
        return self.model_type not in ("gpt2", "opt")

def config_from_hf(hf, file="config.json"):
    """Config from a config.json dict, in both layouts: older (rope_theta, torch_dtype) and
    transformers 5 (rope_parameters, dtype); every value it reads checked first (runs.check_config),
    `file` named in errors."""
    check_config(hf, file, ACTIVATIONS)
    cfg = family_config(hf, file)
    if cfg.n_head % cfg.n_kv_head or (cfg.n_head * cfg.head_dim != cfg.d_model and not cfg.rope):
        raise ValueError(f"{file}: {cfg.n_head} attention heads of size {cfg.head_dim} in "
                         f"{cfg.n_kv_head} key-value groups do not fit a width of {cfg.d_model}")
    return cfg

def family_config(hf, file):
    """config_from_hf's mapping of each family's keys to Config."""
    family = hf.get("model_type")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    tied = hf.get("tie_word_embeddings", family in ("gpt2", "opt"))
    common = dict(model_type=family, vocab_size=hf["vocab_size"], hf=hf, tie_word_embeddings=tied,
                  dtype=dtype)

    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"{file}: GPT-2's scale_attn_by_inverse_layer_idx / "
                             "reorder_and_upcast_attn are not supported")
        width, heads = hf["n_embd"], hf["n_head"]
        return Config(d_model=width, n_layer=hf["n_layer"], n_head=heads, n_kv_head=heads,
                      head_dim=width // heads, d_ff=hf.get("n_inner") or 4 * width,
                      max_pos=hf["n_positions"], act=hf.get("activation_function", "gelu_new"),
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      qkv_bias=True, o_bias=True, mlp_bias=True, **common)

    if family == "opt":
        width, heads = hf["hidden_size"], hf["num_attention_heads"]
        bias = hf.get("enable_bias", True)
        pre_norm = hf.get("do_layer_norm_before", True)
        proj_dim = hf.get("word_embed_proj_dim", width)
        return Config(d_model=width, n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=heads,
                      head_dim=width // heads, d_ff=hf["ffn_dim"],
                      max_pos=hf["max_position_embeddings"],
                      act=hf.get("activation_function", "relu"), pre_norm=pre_norm,
                      final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
                      qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                      proj_dim=proj_dim if proj_dim != width else 0, **common)

    if family in ("llama", "qwen2", "qwen3", "mistral"):
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.setdefault("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "yarn"):
            raise ValueError(f"{file}: rope type {rope_type!r} is not supported "
                             "(only 'default', 'llama3', 'yarn')")
        width, heads = hf["hidden_size"], hf["num_attention_heads"]
        max_pos = hf.get("max_position_embeddings", 4096)
        key = "original_max_position_embeddings"  # transformers' order: top level, rope, max_pos
        rope[key] = hf.get(key, rope.get(key, max_pos))
        bias = hf.get("attention_bias", False) and family != "mistral"
        slides = family == "mistral" or hf.get("use_sliding_window", False)  # Qwen: if switched on
        cfg = Config(d_model=width, n_layer=hf["num_hidden_layers"], n_head=heads,
                     n_kv_head=hf.get("num_key_value_heads") or heads,
                     head_dim=hf.get("head_dim") or width // heads,
                     d_ff=hf["intermediate_size"], max_pos=max_pos,
                     act=hf.get("hidden_act", "silu"), norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                     qkv_bias=family == "qwen2" or bias, o_bias=bias,
                     mlp_bias=hf.get("mlp_bias", False), qk_norm=family == "qwen3",
                     sliding_window=(hf.get("sliding_window") or 0) if slides else 0,
                     rope_params=rope, **common)
        rope_inv_freq(cfg, "cpu")  # a rope key missing raises its KeyError here, not in a forward
        return cfg

    raise ValueError(f"{file}: unsupported model_type {family!r} "
                     "(supported: gpt2, opt, qwen2, qwen3, llama, mistral)")

# ----------------------------------------------------------------------------------- Layers

class RMSNormFunction(torch.autograd.Function):
    """y = w * n, n = x r, r = 1 / sqrt(mean(x^2) + eps), statistics in fp32 at least (as the
    reference code); dx = r (g - n mean(g n)) with g = w dy, dw = sum(dy n).
    Saves x and r only: n is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        y = weight * (x32 * rstd).to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):  # cast once here, not by each GEMM that reads y
            return y.to(torch.get_autocast_dtype(x.device.type))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        g = (dy * weight).to(rstd.dtype)
        dx = rstd * (g - n * (g * n).mean(-1, keepdim=True))
        dw = (dy * n.to(x.dtype)).flatten(0, -2).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None

class RMSNorm(nn.Module):
    """Llama's and Qwen2's norm: RMSNormFunction with a learned scale."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps)

def make_norm(cfg):
    """LayerNorm with bias (GPT-2, OPT) or RMSNorm (the RoPE families)."""
    if cfg.rope:
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

def rotate(x, cos, sin):
    """Rotate-half RoPE; x [B, T, H, hd], cos / sin [B, T, 1, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

def visible(segment_ids, branch_ids, b, q, k):
    """The packed layout's attention rule (data.collate): key k is visible to query q in row b when
    both lie in one example, k is not later, and k is in the prompt (branch 0) or in q's own answer.
    Indices broadcast: the per-example masks (CPU) and FlexAttention's mask_mod (CUDA) share it."""
    same = (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)
    return same & ((branch_ids[b, k] == 0) | (branch_ids[b, k] == branch_ids[b, q]))

@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled (eager materializes all scores), dynamic in the row length after one
    recompile."""
    return torch.compile(flex_attention)

class Attention(nn.Module):
    """Causal self-attention: fused q|k|v, grouped-query heads, RoPE (rope families), Qwen3's
    per-head q / k RMSNorm before RoPE (modeling_qwen3.Qwen3Attention), an optional KV cache
    written at each token's position pos [B, T]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.n_head * cfg.head_dim
        self.kv_size = cfg.n_kv_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.q_size, cfg.d_model, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, mask, cache, pos):
        B, T, _ = x.shape
        c = self.cfg
        gqa = c.n_kv_head != c.n_head

        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, c.n_head, c.head_dim)     # [B, T, H, hd]
        k = k.view(B, T, c.n_kv_head, c.head_dim)  # [B, T, Hkv, hd]
        v = v.view(B, T, c.n_kv_head, c.head_dim)  # [B, T, Hkv, hd]
        if self.q_norm is not None:  # over each head's hd features
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # q and k become new tensors: a copy of v lets autograd keep v alone, not all of qkv
            q, k, v = rotate(q, *rope), rotate(k, *rope), v.contiguous()
        # heads second by a view: SDPA (CPU) and FlexAttention write y in q's stride order, so o
        # reads y [B, T, H * hd] as a view of the output they keep for backward, not a copy
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, hd]

        if cache is not None:  # write each token at its position, attend over the cache (mask)
            rows = torch.arange(B, device=x.device)[:, None]
            cache[0][rows, :, pos] = k.transpose(1, 2)  # [B, T, Hkv, hd] into [B, Hkv, L, hd]
            cache[1][rows, :, pos] = v.transpose(1, 2)
            k, v = cache
        if cache is not None and T == 1:  # decode: a KV head's query heads as its rows, one cache pass
            q = q.reshape(B, c.n_kv_head, -1, c.head_dim)  # [B, Hkv, H / Hkv, hd]

        if isinstance(mask, BlockMask):  # CUDA, packed row: FlexAttention skips masked-out blocks
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
        elif isinstance(mask, list):  # CPU, packed row: each example's span apart, o on each span
            sizes = [m.shape[0] for m in mask]  # split, not slices: backward is one concatenation
            spans = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), mask)
            ys = [F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, enable_gqa=gqa)
                  for qs, ks, vs, m in spans]  # [B, H, L, hd] each
            return torch.cat([self.o(y.transpose(1, 2).flatten(2)) for y in ys], 1)  # [B, T, d]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)  # [B, H, T, hd]

        y = y.view(B, c.n_head, T, c.head_dim).transpose(1, 2).reshape(B, T, self.q_size)  # [B, T, H * hd]
        return self.o(y)

class SwiGLUDown(torch.autograd.Function):
    """y = h W^T + b with h = silu(g) u; dh = dy W, dg = dh u s (1 + g (1 - s)) with s = sigmoid(g),
    du = dh silu(g), dW = dy^T h, db = sum(dy). Saves g, u and W only: h [N, f] is recomputed in
    backward, and W is cast to h's dtype in each pass (autocast's bf16 copy is not kept).
      g, u [..., f] the gate's and up's outputs, weight [d, f], bias [d] or None -> y [..., d]"""

    @staticmethod
    def forward(ctx, g, u, weight, bias):
        ctx.save_for_backward(g, u, weight)
        h = F.silu(g) * u  # [..., f]
        return F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[2:]  # a frozen down (LoRA elsewhere): no dW
        silu_g = F.silu(g)
        dh = dy @ weight.to(dy.dtype)  # [..., f]
        dg = torch.ops.aten.silu_backward(dh * u, g)  # aten's fused silu' (2x faster)

        dy_2d = dy.flatten(0, -2)  # [N, d]
        dw = (dy_2d.T @ (silu_g * u).flatten(0, -2)).to(weight.dtype) if need_weight else None
        db = dy_2d.sum(0).to(weight.dtype) if need_bias else None  # [d]
        return dg, dh * silu_g, dw, db  # dw [d, f]

class MLP(nn.Module):
    """SwiGLU down(act(gate(x)) * up(x)) for the RoPE families, down(act(up(x))) for GPT-2 / OPT."""

    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        gated = cfg.rope  # SwiGLU families only
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias) if gated else None
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        up = self.up(x)
        if self.gate is None:
            return self.down(self.act(up))
        if self.act is F.silu and type(self.down) is nn.Linear:  # LoRA's down: the module path
            return SwiGLUDown.apply(self.gate(x), up, self.down.weight, self.down.bias)
        return self.down(self.act(self.gate(x)) * up)

class Block(nn.Module):
    """One layer: pre-norm x + f(norm(x)), or the post-norm norm(x + f(x)) of OPT-350m."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, pos=None):
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), rope, mask, cache, pos)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, rope, mask, cache, pos))
        return self.ln_2(x + self.mlp(x))

# ----------------------------------------------------------------------------------- The decoder

class GPT(nn.Module):
    """The decoder: embeddings, blocks, final norm and, unless lm_head=False, the LM head."""

    def __init__(self, cfg, lm_head=True):
        super().__init__()
        self.config = cfg
        emb_dim = cfg.proj_dim or cfg.d_model
        n_positions = cfg.max_pos + (2 if cfg.model_type == "opt" else 0)

        self.wte = nn.Embedding(cfg.vocab_size, emb_dim)
        self.wpe = None if cfg.rope else nn.Embedding(n_positions, cfg.d_model)
        self.project_in = nn.Identity()
        self.project_out = nn.Identity()
        if cfg.proj_dim:
            self.project_in = nn.Linear(emb_dim, cfg.d_model, bias=False)
            self.project_out = nn.Linear(cfg.d_model, emb_dim, bias=False)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(emb_dim, cfg.vocab_size, bias=False) if lm_head else None
        if lm_head and cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpointing = False

    def init_weights(self, std=0.02):
        """For training from scratch (also after to_empty): N(0, std) weights, zero biases, unit
        norms, like HF's."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        return self

    def forward(self, input_ids, attention_mask=None, return_hidden=False, cache=None, start=0,
                layout=None):
        """input_ids [B, T] -> logits [B, T, V], or final hidden states [B, T, d'] with return_hidden.

        attention_mask [B, T] (1 = real token) allows left or right padding. cache: per block the
        keys / values [B, Hkv, L, hd] that generate.py keeps; the tokens go to positions start + t
        (start an int, or [B, 1] one per row) and attend to the cache up to their own. layout: a
        batch of data.collate (position_ids, segment_ids, branch_ids), the packed row.
        """
        device_type = input_ids.device.type  # masks and RoPE in the dtype q and k have: no casts
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.wte.weight.dtype
        if layout is not None:
            pos, mask = self.packed_mask(input_ids, layout, dtype)
        elif cache is not None:
            pos = (start + torch.arange(input_ids.shape[1], device=input_ids.device)).expand_as(input_ids)
            mask = (torch.arange(cache[0][0].shape[2], device=pos.device) <= pos[..., None])[:, None]
        else:
            pos, mask = self.padded_mask(input_ids, attention_mask)
        rope = rope_cos_sin(self.config, pos, dtype) if self.config.rope else None

        x = self.project_in(self.wte(input_ids))  # [B, T, d]
        if self.wpe is not None:  # OPT stores max_pos + 2 learned positions and skips the first two
            x = x + self.wpe(pos + (2 if self.config.model_type == "opt" else 0))

        for i, block in enumerate(self.h):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, None if cache is None else cache[i], pos)

        x = self.project_out(self.ln_f(x))  # [B, T, d']
        return x if return_hidden else self.lm_head(x)

    def packed_mask(self, input_ids, layout, dtype):
        """-> (positions [1, T], mask) of data.collate's packed row: the rule `visible` as one
        FlexAttention block mask over the row (CUDA, where a dense mask would turn SDPA's flash
        kernels off), or as one additive mask per example, for SDPA over its span alone (CPU)."""
        B, T = input_ids.shape
        device = input_ids.device
        segment_ids, branch_ids = layout["segment_ids"], layout["branch_ids"]  # [1, T]

        def rule(b, h, q, k):
            return visible(segment_ids, branch_ids, b, q, k)

        if device.type == "cuda":
            return layout["position_ids"], create_block_mask(rule, B, None, T, T, device=device)
        # one additive [L, L] mask per example, in order (SDPA would keep a float copy of a bool one)
        sizes = torch.unique_consecutive(segment_ids[0], return_counts=True)[1].tolist()
        spans = torch.arange(T, device=device).split(sizes)
        mask = [torch.where(rule(0, None, s[:, None], s), 0.0, float("-inf")).to(dtype) for s in spans]
        return layout["position_ids"], mask

    def padded_mask(self, input_ids, attention_mask):
        """-> (positions [B, T], mask): None (causal) without attention_mask, else a bool
        [B, 1, T, T]. Positions count real tokens only, so a left-padded prompt sees the positions of
        an unpadded one; a pad query attends to itself (no mask row is empty)."""
        B, T = input_ids.shape
        if attention_mask is None:
            return torch.arange(T, device=input_ids.device).expand(B, T), None

        real = attention_mask.bool()  # [B, T]
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        return pos, mask[:, None]  # [B, 1, T, T]

def rope_inv_freq(cfg, device):
    """-> (inverse frequencies [hd / 2], attention factor) as transformers' modeling_rope_utils.
    default: f_i = theta^(-2i / hd). llama3 (_compute_llama3_parameters), L the original length:
    wavelengths 2 pi / f_i over L / low_freq_factor become f_i / factor, under L / high_freq_factor
    stay, between blend by s = (L / wavelength - low) / (high - low).
    yarn (_compute_yarn_parameters): (1 - e) f_i / factor + e f_i, e falling from 1 to 0 over the
    dimensions between those turning beta_fast and beta_slow times in L positions; cos / sin times
    0.1 ln(factor) + 1 (or DeepSeek's mscale ratio, or attention_factor)."""
    p, hd, theta = cfg.rope_params, cfg.head_dim, cfg.rope_theta
    pos_freqs = theta ** (torch.arange(0, hd, 2, device=device).float() / hd)  # [hd / 2]
    inv_freq = 1.0 / pos_freqs
    kind, old = p.get("rope_type", "default"), p.get("original_max_position_embeddings")

    if kind == "llama3":
        wavelength = 2 * math.pi / inv_freq  # [hd / 2]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        smooth = ((old / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short
        return (1 - smooth) * inv_freq / p["factor"] + smooth * inv_freq, 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    factor = p.get("factor") or cfg.max_pos / old

    def dimension(turns):  # the dimension whose frequency turns `turns` times in `old` positions
        return hd * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(p.get("beta_fast") or 32), dimension(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    ramp = (torch.arange(hd // 2, device=device).float() - low) / ((high - low) or 0.001)
    extrapolation = 1 - ramp.clamp(0, 1)  # [hd / 2]: 1 keeps f_i, 0 interpolates f_i / factor
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + inv_freq * extrapolation

    def mscale(m):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    ratio = p.get("mscale") and p.get("mscale_all_dim")  # DeepSeek's form
    default = mscale(p["mscale"]) / mscale(p["mscale_all_dim"]) if ratio else mscale(1)
    return inv_freq, p.get("attention_factor") or default

def rope_cos_sin(cfg, pos, dtype):
    """RoPE's tables for positions pos [B, T]: angles pos * f_i (rope_inv_freq), each frequency
    twice (rotate-half), times the attention factor -> (cos, sin), each [B, T, 1, hd]."""
    inv_freq, scale = rope_inv_freq(cfg, pos.device)  # [hd / 2]
    angles = pos[:, :, None].float() * inv_freq  # [B, T, hd / 2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # [B, T, 1, hd]
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

class RewardModel(nn.Module):
    """pi_w(x, y) -> R: the backbone with its LM head replaced by a linear layer to one output, read
    at each answer's last token (the EOS included). transformers' *ForSequenceClassification reads
    the last token that is not pad_token_id instead, so it skips an EOS that is also the pad token;
    we score the whole sequence."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = GPT(cfg, lm_head=False)
        self.score = nn.Linear(cfg.proj_dim or cfg.d_model, 1, bias=False)

    def forward(self, input_ids, layout):
        """input_ids, layout: a batch of data.collate -> [A] scores, one per answer, read at
        layout["last_index"]."""
        hidden = self.body(input_ids, return_hidden=True, layout=layout)  # [1, T, d']
        last = hidden.flatten(0, 1)[layout["last_index"]]  # [A, d']
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()

# ----------------------------------------------------------------------------------- Checkpoint names
# Our module -> the Hugging Face module(s) it is made of, per family, without the family prefix
# ("transformer." / "model."); {i} is the layer. Several HF modules are concatenated along dim 0
# (our fused q|k|v). GPT-2 stores its Conv1D weights as [in, out]: those are transposed.

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
HF_NAMES = {
    "gpt2": {
        "wte": "wte", "wpe": "wpe", "ln_f": "ln_f",
        "h.{i}.ln_1": "h.{i}.ln_1", "h.{i}.ln_2": "h.{i}.ln_2",
        "h.{i}.attn.qkv": "h.{i}.attn.c_attn", "h.{i}.attn.o": "h.{i}.attn.c_proj",
        "h.{i}.mlp.up": "h.{i}.mlp.c_fc", "h.{i}.mlp.down": "h.{i}.mlp.c_proj",
    },
    "opt": {
        "wte": "decoder.embed_tokens", "wpe": "decoder.embed_positions",
        "ln_f": "decoder.final_layer_norm",
        "project_in": "decoder.project_in", "project_out": "decoder.project_out",
        "h.{i}.ln_1": "decoder.layers.{i}.self_attn_layer_norm",
        "h.{i}.ln_2": "decoder.layers.{i}.final_layer_norm",
        "h.{i}.attn.qkv": tuple("decoder.layers.{i}." + n for n in QKV),
        "h.{i}.attn.o": "decoder.layers.{i}.self_attn.out_proj",
        "h.{i}.mlp.up": "decoder.layers.{i}.fc1", "h.{i}.mlp.down": "decoder.layers.{i}.fc2",
    },
    "llama": {
        "wte": "embed_tokens", "ln_f": "norm",
        "h.{i}.ln_1": "layers.{i}.input_layernorm",
        "h.{i}.ln_2": "layers.{i}.post_attention_layernorm",
        "h.{i}.attn.qkv": tuple("layers.{i}." + n for n in QKV),
        "h.{i}.attn.o": "layers.{i}.self_attn.o_proj",
        "h.{i}.mlp.gate": "layers.{i}.mlp.gate_proj",
        "h.{i}.mlp.up": "layers.{i}.mlp.up_proj", "h.{i}.mlp.down": "layers.{i}.mlp.down_proj",
    },
}
HF_NAMES["qwen2"] = HF_NAMES["mistral"] = HF_NAMES["llama"]
HF_NAMES["qwen3"] = dict(HF_NAMES["llama"], **{"h.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                                               "h.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"})
PREFIXES = dict(gpt2="transformer.", opt="model.", llama="model.", qwen2="model.", qwen3="model.",
                mistral="model.")
IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers some files carry
CONV1D = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")  # GPT-2 modules stored as [in, out]
HEADS = ("lm_head.weight", "score.weight")  # stored without the family prefix

def hf_names(cfg, ours):
    """Our parameter name -> (its HF tensor names, transposed?); e.g. "h.3.attn.qkv.weight" ->
    (("layers.3.self_attn.q_proj.weight", "layers.3.self_attn.k_proj.weight", ...), False)."""
    if ours in HEADS:
        return (ours,), False
    module, kind = ours.rsplit(".", 1)
    layer = module.split(".")[1] if module.startswith("h.") else None
    pattern = module.replace(f"h.{layer}.", "h.{i}.") if layer else module
    theirs = HF_NAMES[cfg.model_type][pattern]
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    conv1d = cfg.model_type == "gpt2" and kind == "weight" and module.endswith(CONV1D)
    return tuple(n.format(i=layer) + "." + kind for n in theirs), conv1d

# ----------------------------------------------------------------------------------- Load and save

def read_safetensors(path):
    """-> {name without family prefix: (file, name in file)} over one file or a sharded index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
        outside = [f for f in files if os.path.isabs(f) or os.path.normpath(f).startswith("..")]
        if outside:
            raise ValueError(f"{index}: shard {outside[0]!r} lies outside the checkpoint folder")
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

    where = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, "pt") as f:
                keys = list(f.keys())
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        for key in keys:
            short = key.split(".", 1)[1] if key.startswith(("transformer.", "model.")) else key
            where[short] = (file, key)
    return where

def load_model(path, dtype=None, device="cpu", reward=False, trained_head=False):
    """Load a local HF checkpoint folder as a GPT (or, with reward=True, a RewardModel).

    dtype None keeps the checkpoint's own dtype (config.json's dtype / torch_dtype). A missing,
    unexpected or wrongly shaped tensor raises an error naming the tensor and the file. With
    reward=True the scalar head comes from `score.weight`, else it is fresh (a pretrained LM becomes
    an annotator) unless trained_head=True (a judge).
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        cfg = config_from_hf(read_json(cfg_file), cfg_file)
    except KeyError as e:
        raise KeyError(f"{cfg_file}: missing key {e.args[0]!r}") from None
    dtype = dtype or DTYPES.get(cfg.dtype, torch.float32)
    with torch.device("meta"):
        model = RewardModel(cfg) if reward else GPT(cfg)

    where = read_safetensors(path)
    state, used = {}, set()
    for full_name, param in model.named_parameters():  # a tied lm_head is not listed: it is wte
        ours = full_name.removeprefix("body.")
        theirs, transposed = hf_names(cfg, ours)
        if ours == "score.weight" and ours not in where:  # a fresh scalar head on a pretrained LM
            if trained_head:  # a random head would judge at random (GRA 0 or 100 by the draw)
                raise KeyError(f"{path}: checkpoint lacks tensor 'score.weight': a trained scalar head is needed")
            std = cfg.hf.get("initializer_range", 0.02)
            state[full_name] = torch.randn(param.shape, dtype=dtype) * std
            continue

        parts = []
        for name in theirs:
            if name not in where:
                raise KeyError(f"{path}: checkpoint lacks tensor {PREFIXES[cfg.model_type] + name!r} (for {ours})")
            with safe_open(where[name][0], "pt") as f:
                parts.append(f.get_tensor(where[name][1]))
        for name, part in zip(theirs, parts):
            if not part.is_floating_point():
                raise ValueError(f"{where[name][0]}: tensor {where[name][1]!r} has dtype {part.dtype}, "
                                 "not a floating-point type")
        tensor = torch.cat([p.t() if transposed else p for p in parts])
        if tensor.shape != param.shape:
            file, key = where[theirs[0]]
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(parts[0].shape)}, "
                             f"config.json implies {tuple(param.shape)} for {ours}")
        state[full_name] = tensor.to(dtype).contiguous()
        used.update(theirs)

    unexpected = [n for n in where if n not in used and not n.endswith(IGNORED) and n not in HEADS]
    if unexpected:
        file, key = where[unexpected[0]][0], where[unexpected[0]][1]
        raise ValueError(f"{path}: unexpected tensor {key!r} in {file} ({len(unexpected)} "
                         f"unexpected in all) for model_type {cfg.model_type!r}")

    model.load_state_dict(state, strict=False, assign=True)
    body = model.body if reward else model
    if body.lm_head is not None and cfg.tie_word_embeddings:
        body.lm_head.weight = body.wte.weight
    cfg.dtype = str(dtype).replace("torch.", "")
    return model.to(device)

def save_model(model, path, whole=None):
    """Write model.safetensors + config.json into the folder `path` in the HF layout, from `whole`
    (a sharded model's gathered state dict) or the model's parameters; config.json is removed first,
    written last: no half a model. An earlier sharded save there (index and shards) is removed."""
    cfg = model.config
    reward = isinstance(model, RewardModel)
    whole = model.state_dict() if whole is None else whole
    kv = cfg.n_kv_head * cfg.head_dim

    state = {}
    for ours, _ in model.named_parameters():  # a tied lm_head is not listed (nor stored by HF)
        param = whole[ours].detach()
        if not torch.isfinite(param).all():
            raise FloatingPointError(f"{path}: not saved, tensor {ours} holds NaN or inf")
        ours = ours.removeprefix("body.")
        theirs, transposed = hf_names(cfg, ours)
        parts = param.split([cfg.n_head * cfg.head_dim, kv, kv]) if len(theirs) == 3 else [param]
        for name, part in zip(theirs, parts):
            prefix = "" if name in HEADS else PREFIXES[cfg.model_type]
            state[prefix + name] = (part.t() if transposed else part).contiguous().cpu()

    cls = dict(gpt2="GPT2", opt="OPT", llama="Llama", qwen2="Qwen2", qwen3="Qwen3",
               mistral="Mistral")[cfg.model_type]
    head = "ForSequenceClassification" if reward else "ForCausalLM"
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    hf = dict(cfg.hf, dtype=dtype, model_type=cfg.model_type, architectures=[cls + head])
    hf.pop("torch_dtype", None)
    if reward:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})

    config_file = clear_checkpoint(path)
    atomic_write(os.path.join(path, "model.safetensors"),
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(config_file, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(hf, indent=2)))
