"""One decoder-only transformer, configured (not subclassed) into OLMo 1, OLMo 2, Olmo 3, OLMoE, BLOOM or Llama style.

    OLMo 1   pre-norm blocks, non-parametric LayerNorm, SwiGLU, RoPE θ=1e4, no biases, "mitchell" init
    OLMo 2   norm on each sub-layer's *output* before the residual add, RMSNorm, QK-norm, RoPE θ=5e5
    Olmo 3   OLMo 2 plus sliding-window attention in three of every four layers, YaRN on the full ones
    OLMoE    pre-norm, RMSNorm, QK-norm, RoPE θ=1e4, a mixture of SwiGLU experts (softmax router, top-k)
    BLOOM    pre-norm, LayerNorm with affine, ALiBi, GELU MLP, biases, LayerNorm after the embedding
    Llama    pre-norm, RMSNorm with weight, no QK-norm, SwiGLU, RoPE (optionally llama3 / linear / YaRN scaled);
             Mistral is Llama, Qwen2 is Llama with q/k/v biases (`qkv_bias`)

Attention goes through `attention()`: SDPA (flash kernels on GPU for plain causal layers), and for sliding
windows on GPU whichever fast path is installed (flash-attn's window, else flex attention). Optional
intra-document masking takes `doc_ids` (one document index per position) so tokens attend only inside their
document, with positions restarting at each document (a packed example sees what it would alone). A `KVCache`
makes generation incremental; positions come from the caller so left-padded batches work.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.core.config import require
from lmforge.tokens.tokenizer import pad_vocab_size


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); fewer = grouped-query attention
    vocab_size: int = 50_280  # the tokenizer's; the embedding is padded to a multiple of 128
    mlp_hidden_size: int = 512
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_affine: bool = True
    norm_eps: float = 1e-6
    block: Literal["prenorm", "reordered"] = "reordered"
    qk_norm: bool = True
    position: Literal["rope", "alibi"] = "rope"
    rope_theta: float = 500_000.0
    bias: bool = False  # every linear and LayerNorm
    qkv_bias: bool = False  # the query/key/value projections only (Qwen2)
    embedding_norm: bool = False
    tie_embeddings: bool = False
    clip_qkv: float | None = None
    max_sequence_length: int = 4096
    # Sliding-window attention (Olmo 3): a query sees itself and the `sliding_window - 1` keys before it, except
    # in every `full_attention_every`-th layer and the last layer, which attend to the whole context.
    sliding_window: int | None = None
    full_attention_every: int = 4
    # YaRN RoPE scaling (Olmo 3 long context) of the full-attention layers; sliding layers keep plain RoPE.
    yarn_factor: float | None = None  # None: plain RoPE everywhere
    yarn_original_context: int = 8192
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None  # None: 0.1·ln(factor) + 1, the YaRN paper's
    # The other RoPE scalings (at most one scaling is set), also on full-attention layers only: linear position
    # interpolation (frequencies / factor), and Llama 3.1's per-band rescaling.
    rope_linear_factor: float | None = None
    llama3_rope_factor: float | None = None
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_original_context: int = 8192
    # Mixture of experts (OLMoE): n_experts SwiGLU experts of mlp_hidden_size each, top-k routing, dropless.
    n_experts: int = 0  # 0: a dense MLP
    moe_top_k: int = 8
    moe_norm_top_k: bool = False  # renormalise the top-k router weights to sum to 1
    moe_lb_loss_coef: float = 0.01  # load-balancing loss weight (transformers' router_aux_loss_coef)
    moe_z_loss_coef: float = 0.001  # router z-loss weight
    init: Literal["normal", "mitchell"] = "normal"
    init_std: float = 0.02
    init_truncate: bool = True
    eos_token_id: int = 50_279
    pad_token_id: int = 1
    bos_token_id: int | None = None
    vocab_multiple: int = 128
    family: str = field(default="olmo2",
                        metadata={"help": "label only: olmo, olmo2, olmo3, olmoe, bloom, llama or custom"})

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "mlp_hidden_size",
                     "max_sequence_length", "vocab_multiple"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                f"must be divisible by n_heads ({self.n_heads})")
        require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                f"must divide n_heads ({self.n_heads})")
        require(self.position != "rope" or self.head_dim % 2 == 0, "d_model", self.d_model,
                f"RoPE needs an even head_dim (d_model / n_heads), got {self.head_dim}")
        if self.sliding_window is not None:
            require(1 <= self.sliding_window <= self.max_sequence_length, "sliding_window", self.sliding_window,
                    f"must be between 1 and max_sequence_length ({self.max_sequence_length})")
        require(self.full_attention_every >= 1, "full_attention_every", self.full_attention_every, "must be positive")
        if self.yarn_factor is not None:
            require(self.yarn_factor >= 1, "yarn_factor", self.yarn_factor, "must be at least 1 (or null for no YaRN)")
            require(self.position == "rope", "yarn_factor", self.yarn_factor, "needs position: rope")
            require(self.yarn_original_context > 0, "yarn_original_context", self.yarn_original_context,
                    "must be positive")
            require(self.yarn_beta_fast > self.yarn_beta_slow > 0, "yarn_beta_slow", self.yarn_beta_slow,
                    f"must be positive and below yarn_beta_fast ({self.yarn_beta_fast})")
        scalings = [n for n in ("yarn_factor", "rope_linear_factor", "llama3_rope_factor") if getattr(self, n) is not None]
        require(len(scalings) <= 1, scalings[-1] if scalings else "", None, f"one RoPE scaling at most, got {scalings}")
        for name in ("rope_linear_factor", "llama3_rope_factor"):
            if getattr(self, name) is not None:
                require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1 (or null)")
                require(self.position == "rope", name, getattr(self, name), "needs position: rope")
        if self.llama3_rope_factor is not None:
            require(self.llama3_high_freq_factor > self.llama3_low_freq_factor > 0, "llama3_low_freq_factor",
                    self.llama3_low_freq_factor, f"must be positive and below llama3_high_freq_factor "
                    f"({self.llama3_high_freq_factor})")
            require(self.llama3_original_context > 0, "llama3_original_context", self.llama3_original_context,
                    "must be positive")
        require(self.n_experts >= 0, "n_experts", self.n_experts, "must be 0 (dense) or positive")
        if self.n_experts:
            require(1 <= self.moe_top_k <= self.n_experts, "moe_top_k", self.moe_top_k,
                    f"must be between 1 and n_experts ({self.n_experts})")
            require(self.mlp == "swiglu" and not self.bias, "mlp", self.mlp, "experts are SwiGLU without biases")
            for name in ("moe_lb_loss_coef", "moe_z_loss_coef"):
                require(getattr(self, name) >= 0, name, getattr(self, name), "must be non-negative")

    def layer_window(self, layer: int) -> int | None:
        """The layer's attention window, None for full attention."""
        if self.sliding_window is None or layer == self.n_layers - 1 or (layer + 1) % self.full_attention_every == 0:
            return None
        return self.sliding_window

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def embedding_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.vocab_multiple)


def make_norm(config: ModelConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.norm_eps, config.norm_affine)
    return LayerNorm(size, config.norm_eps, config.norm_affine, config.bias and config.norm_affine)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 (as OLMo 2 does) and cast back."""

    def __init__(self, size: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = self.weight.float() * h
        return h.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm in fp32; OLMo 1 uses it without gain or bias (non-parametric)."""

    def __init__(self, size: int, eps: float, affine: bool, bias: bool):
        super().__init__()
        self.size, self.eps = size, eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.size,), w, b, self.eps).to(x.dtype)


def rope_frequencies(config: ModelConfig, scaled: bool, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (head_dim / 2) and the factor on cos/sin, with the configured scaling when
    `scaled` (a full-attention layer): linear (frequencies / factor), llama3 (`_llama3_frequencies`), or YaRN
    (Peng et al. 2023, as transformers computes it: a ramp between interpolated and original frequencies over
    the dimensions whose wavelength lies between original_context / beta_fast and / beta_slow rotations)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if scaled and config.rope_linear_factor is not None:
        return inv_freq / config.rope_linear_factor, 1.0
    if scaled and config.llama3_rope_factor is not None:
        return _llama3_frequencies(config, inv_freq), 1.0
    if not scaled or config.yarn_factor is None:
        return inv_freq, 1.0
    factor, context = config.yarn_factor, config.yarn_original_context

    def dimension(rotations: float) -> float:  # the dimension whose wavelength makes `rotations` turns in context
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension(config.yarn_beta_fast)), 0)
    high = min(math.ceil(dimension(config.yarn_beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = config.yarn_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def _llama3_frequencies(config: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original_context / low_freq_factor are interpolated (/ factor), those
    shorter than original_context / high_freq_factor kept, and the band between blended linearly in
    original_context / wavelength."""
    factor, low, high = config.llama3_rope_factor, config.llama3_low_freq_factor, config.llama3_high_freq_factor
    context = config.llama3_original_context
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * (1 - smooth) + inv_freq * smooth


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, L, head_dim) for integer positions (B, L), in full precision, times `scale`."""
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s geometric slopes, with BLOOM's interleaving when n_heads is not a power of two."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class KVCache:
    """Per-layer key/value buffers of shape (B, n_kv_heads, capacity, head_dim), in token order. A full-attention
    layer keeps every token (capacity max_len); a sliding-window layer keeps only the last window - 1 tokens,
    all that a later query can see, so its memory stays bounded by the window however long generation runs.
    With dtype None a layer's buffers take the dtype of its first keys: a mixed-precision forward (autocast,
    FSDP's parameter dtype) computes them in a dtype the parameters outside it do not show."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype | None):
        self.config, self.device = config, device
        self.windows = [config.layer_window(i) for i in range(config.n_layers)]
        self.shapes = [(batch_size, config.n_kv_heads, max_len if window is None else min(window - 1, max_len),
                        config.head_dim) for window in self.windows]
        self.keys: list[torch.Tensor | None] = [None] * config.n_layers
        self.values: list[torch.Tensor | None] = [None] * config.n_layers
        if dtype is not None:
            for layer in range(config.n_layers):
                self._allocate(layer, dtype)
        self.length = 0

    def _allocate(self, layer: int, dtype: torch.dtype) -> None:
        self.keys[layer] = torch.zeros(self.shapes[layer], device=self.device, dtype=dtype)
        self.values[layer] = torch.zeros(self.shapes[layer], device=self.device, dtype=dtype)

    def held(self, window: int | None) -> int:
        """Tokens a layer with this window holds now: the most recent ones."""
        return self.length if window is None else min(self.length, window - 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values; returns those the new queries attend over (held + new)."""
        if self.keys[layer] is None:
            self._allocate(layer, k.dtype)
        if self.windows[layer] is None:
            end = self.length + k.shape[2]
            self.keys[layer][:, :, self.length:end] = k
            self.values[layer][:, :, self.length:end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        held = self.held(self.windows[layer])
        keys = torch.cat([self.keys[layer][:, :, :held], k], dim=2)
        values = torch.cat([self.values[layer][:, :, :held], v], dim=2)
        keep = min(keys.shape[2], self.keys[layer].shape[2])
        self.keys[layer][:, :, :keep] = keys[:, :, keys.shape[2] - keep:]
        self.values[layer][:, :, :keep] = values[:, :, values.shape[2] - keep:]
        return keys, values

    def select(self, rows: torch.Tensor, max_len: int) -> "KVCache":
        """A cache of these batch rows with room for max_len tokens in all, holding what this one holds. The
        copies are differentiable: a gradient through the new cache reaches the rows it came from, summed."""
        out = KVCache(self.config, len(rows), max_len, self.device, self.keys[0].dtype)
        for layer, window in enumerate(self.windows):
            held = self.held(window)
            out.keys[layer][:, :, :held] = self.keys[layer][:, :, :held].index_select(0, rows)
            out.values[layer][:, :, :held] = self.values[layer][:, :, :held].index_select(0, rows)
        out.length = self.length
        return out


class LayerMask(NamedTuple):
    """What a layer's queries may attend to. `dense`: a boolean mask, or ALiBi's additive bias, over the keys the
    layer sees (B or 1, 1 or heads, L, keys); None means plain causal attention within `window` (None = all),
    which the fast paths compute without a mask."""

    window: int | None
    dense: torch.Tensor | None


def _causal_window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    return allowed & (key > query - window) if window is not None else allowed


def _sdpa_attention(q, k, v, mask: LayerMask) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    if mask.dense is None and mask.window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    dense = mask.dense if mask.dense is not None else _causal_window_mask(q.shape[2], mask.window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense.to(q.dtype) if dense.is_floating_point() else dense,
                                          enable_gqa=gqa)


def _flex_attention(q, k, v, mask: LayerMask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window, length = mask.window, q.shape[2]

    def causal_window(b, h, query, key):
        return (key <= query) & (query - key < window)

    block_mask = create_block_mask(causal_window, None, None, length, length, device=q.device)
    return _compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _flash_attention(q, k, v, mask: LayerMask) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn's (left, right) window counts keys besides the query's own position.
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                        window_size=(mask.window - 1, 0))
    return y.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, Callable] = {"sdpa": _sdpa_attention, "flex": _flex_attention, "flash": _flash_attention}


def available_attention_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The attention paths usable for a sliding-window layer on this device and dtype, fastest first. The fast
    paths need CUDA; flash-attn also needs half precision."""
    found = []
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn") is not None:
            found.append("flash")
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
            found.append("flex")
    return found + ["sdpa"]


def attention_backend(q: torch.Tensor, mask: LayerMask) -> str:
    """SDPA for full attention and for any explicit mask (padding, documents, ALiBi); for a plain sliding window,
    the fastest path installed."""
    if mask.window is None or mask.dense is not None:
        return "sdpa"
    return available_attention_backends(q.device, q.dtype)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LayerMask) -> torch.Tensor:
    """Softmax attention of q (B, H, L, D) over k, v (B, H_kv, keys, D), with the automatically chosen backend.
    Grouped-query attention (H_kv < H) is each backend's own, never a copy of k and v per query head: repeating
    the cache was a fifth of a GQA model's decoding step at batch 8 (benchmarks/RESULTS.md)."""
    return ATTENTION_BACKENDS[attention_backend(q, mask)](q, k, v, mask)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        kv_size = config.n_kv_heads * config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.q_norm = make_norm(config, config.d_model) if config.qk_norm else None
        self.k_norm = make_norm(config, kv_size) if config.qk_norm else None
        # Context parallelism swaps this from outside (as `MoE.dispatch`) for attention over gathered keys.
        self.attend: Callable = attention

    def forward(self, x, rope, mask: LayerMask, cache: KVCache | None):
        c = self.config
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        if self.q_norm is not None:  # over the whole projection, before the split into heads (OLMo 2)
            q, k = self.q_norm(q), self.k_norm(k)
        # Head counts from the projections' widths: under tensor parallelism a rank holds a slice of the heads.
        q = q.view(B, L, -1, c.head_dim).transpose(1, 2)
        k = k.view(B, L, -1, c.head_dim).transpose(1, 2)
        v = v.view(B, L, -1, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden_size
        self.up_proj = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.gate_proj = nn.Linear(config.d_model, hidden, bias=config.bias) if self.swiglu else None
        self.down_proj = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Experts(nn.Module):
    """The experts' SwiGLU weights stacked as [n_experts, out, in] tensors (nn.Linear's layout per expert), so
    an expert-parallel wrapper can shard them along dim 0 from outside."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        # Expert parallelism swaps this from outside for one that computes with the rank's slice of the experts.
        self.compute: Callable = expert_mlps

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: tokens grouped by expert (expert 0's first), counts: tokens per expert."""
        return self.compute(x, counts, self.gate_proj, self.up_proj, self.down_proj)


def expert_mlps(x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU of expert e (weights gate[e], up[e], down[e]) on the counts[e] tokens of x grouped by expert;
    expert parallelism calls it with the experts a rank holds."""
    if _grouped_mm_usable(x):
        offsets = counts.cumsum(0, dtype=torch.int32)

        def grouped(inputs, weight):
            return torch._grouped_mm(inputs, weight.transpose(-2, -1).to(inputs.dtype), offs=offsets)

        return grouped(F.silu(grouped(x, gate)) * grouped(x, up), down)
    outputs = []
    for e, chunk in enumerate(x.split(counts.tolist())):
        if len(chunk):
            hidden = F.silu(F.linear(chunk, gate[e])) * F.linear(chunk, up[e])
            outputs.append(F.linear(hidden, down[e]))
    return torch.cat(outputs) if outputs else x.new_zeros((0, down.shape[1]))


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs on CUDA (Hopper and later) in bf16; elsewhere a loop over experts.
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def dropless_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Send every token (T, d) to each of its top-k experts (T, k), with no capacity limit (nothing dropped),
    and sum the experts' outputs weighted by the router. An expert-parallel wrapper replaces this function
    (`MoE.dispatch`) with one that exchanges the grouped tokens between ranks."""
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts.gate_proj.shape[0])
    token = order // expert_ids.shape[1]
    y = experts(x[token], counts) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class RouterStats(NamedTuple):
    """One MoE layer's routing over T tokens: how many picks each expert got (no gradient), the sum of each
    expert's router probability, and the sum over tokens of logsumexp(router logits)^2."""

    counts: torch.Tensor
    prob_sum: torch.Tensor
    z_sum: torch.Tensor
    tokens: int


class MoE(nn.Module):
    """OLMoE's feed-forward: a linear router, softmax, top-k experts (weights optionally renormalised), dropless."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_top_k = config.moe_top_k, config.moe_norm_top_k
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, config.d_model, config.mlp_hidden_size)
        self.dispatch: Callable = dropless_dispatch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.norm_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        y = self.dispatch(flat, expert_ids, weights.to(x.dtype), self.experts)
        with torch.no_grad():
            counts = torch.zeros(probs.shape[-1], device=x.device).index_add_(
                0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), device=x.device))
        z_sum = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()
        return y.view_as(x), RouterStats(counts, probs.sum(0), z_sum, flat.shape[0])


class RouterLosses(NamedTuple):
    """The auxiliary losses of a forward through MoE layers and the expert load per layer."""

    load_balancing: torch.Tensor  # transformers' load_balancing_loss_func (before its coefficient)
    z_loss: torch.Tensor  # mean over tokens and layers of logsumexp(router logits)^2
    total: torch.Tensor  # lb_coef · load_balancing + z_coef · z_loss, to add to the training loss
    expert_counts: torch.Tensor  # (MoE layers, experts) picks per expert


def router_losses(stats: list[RouterStats], config: ModelConfig) -> RouterLosses:
    """Switch-Transformer load balancing as transformers' OLMoE computes it: the fraction of picks and the mean
    router probability per expert, each pooled over tokens and layers, then n_experts · Σ_e picks_e · prob_e
    (k for perfectly uniform routing); and ST-MoE's router z-loss."""
    rows = sum(s.tokens for s in stats)
    picks = torch.stack([s.counts for s in stats])
    load_balancing = config.n_experts * (picks.sum(0) / rows * (sum(s.prob_sum for s in stats) / rows)).sum()
    z_loss = sum(s.z_sum for s in stats) / rows
    total = config.moe_lb_loss_coef * load_balancing + config.moe_z_loss_coef * z_loss
    return RouterLosses(load_balancing, z_loss, total, picks)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.reordered = config.block == "reordered"
        self.attn = Attention(config, layer)
        self.mlp = MoE(config) if config.n_experts else MLP(config)
        self.attn_norm = make_norm(config, config.d_model)
        self.mlp_norm = make_norm(config, config.d_model)

    def _feed_forward(self, x) -> tuple[torch.Tensor, RouterStats | None]:
        return self.mlp(x) if isinstance(self.mlp, MoE) else (self.mlp(x), None)

    def forward(self, x, rope, mask: LayerMask, cache) -> tuple[torch.Tensor, RouterStats | None]:
        if self.reordered:
            h = x + self.attn_norm(self.attn(x, rope, mask, cache))
            y, stats = self._feed_forward(h)
            return h + self.mlp_norm(y), stats
        h = x + self.attn(self.attn_norm(x), rope, mask, cache)
        y, stats = self._feed_forward(self.mlp_norm(h))
        return h + y, stats


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.embedding_size, config.d_model)
        self.embed_norm = make_norm(config, config.d_model) if config.embedding_norm else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_router_losses: bool = False,
        last_logits_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, RouterLosses | None]:
        """Logits (B, L, embedding_size); with `return_router_losses`, (logits, RouterLosses or None if dense).
        `last_logits_only`: logits of the last position only (B, 1, embedding_size), all that generation reads;
        the LM head over a whole prompt would cost as much as a fifth of a small model's prefill.

        positions: (B, L) token positions, default 0..L-1 (offset by the cache length).
        attention_mask: (B, total_len) 1 for real tokens, 0 for padding, covering cached + new tokens.
        doc_ids: (B, L) document index per position; attention stays inside a document, and positions (when
            not given) restart at 0 in each document.
        """
        c = self.config
        x = self.embed(input_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        ropes, masks = layer_inputs(c, getattr(self, "alibi_slopes", None), *input_ids.shape, input_ids.device,
                                    positions, attention_mask, doc_ids, cache)
        windows = [c.layer_window(i) for i in range(c.n_layers)]
        stats = []
        for block, window in zip(self.blocks, windows):
            x, layer_stats = block(x, ropes[window], masks[window], cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(self.final_norm(x))
        if not return_router_losses:
            return logits
        return logits, router_losses(stats, c) if stats else None


def layer_inputs(config: ModelConfig, alibi_slopes: torch.Tensor | None, B: int, L: int, device,
                 positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[dict, dict]:
    """What the blocks take besides the hidden states, per distinct attention window: RoPE cos/sin (None with
    ALiBi) and the `LayerMask`. Arguments as `Transformer.forward`'s; a pipeline stage computes them itself."""
    past = cache.length if cache is not None else 0
    if positions is None and doc_ids is not None and past == 0:
        positions = document_positions(doc_ids)  # packed examples see the positions they would alone
    elif positions is None:
        positions = torch.arange(past, past + L, device=device).expand(B, L)
    ropes, masks = {}, {}
    for window in {config.layer_window(i) for i in range(config.n_layers)}:
        if config.position == "rope":  # RoPE scaling, when configured, applies to the full-attention layers only
            inv_freq, scale = rope_frequencies(config, scaled=window is None, device=device)
            ropes[window] = rope_tables(inv_freq, positions, scale)
        else:
            ropes[window] = None
        held = cache.held(window) if cache is not None else 0
        masks[window] = _layer_mask(config, alibi_slopes, window, B, L, past, held, positions, attention_mask,
                                    doc_ids, device)
    return ropes, masks


def _layer_mask(config, alibi_slopes, window, B, L, past, held, positions, attention_mask, doc_ids, device
                ) -> LayerMask:
    """A layer's mask over the keys it sees (the `held` cached ones, then the new ones): None for plain causal
    attention (lets SDPA or a windowed kernel pick its fastest path), else a boolean mask or ALiBi bias."""
    plain_causal = past == 0 and attention_mask is None and doc_ids is None
    if plain_causal and config.position == "rope":
        return LayerMask(window, None)
    total = past + L
    query_pos = torch.arange(past, total, device=device)
    key_pos = torch.arange(past - held, total, device=device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > query_pos[:, None] - window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, past - held:total].bool()
        # A padding query would see no key at all (NaN from softmax); let it see itself.
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if config.position != "alibi":
        return LayerMask(window, allowed)
    # -slope·(query - key), not slope·key: the two differ by a per-query shift softmax ignores, but
    # absolute positions (~1000 at 2k tokens) keep only 8 bits in bf16, distances near the query stay exact.
    key_pos = positions if past == 0 else _key_positions(attention_mask, B, total, device)[:, past - held:]
    distance = (key_pos[:, None, :] - key_pos[:, -L:, None]).float()
    bias = alibi_slopes[None, :, None, None] * distance[:, None]
    return LayerMask(window, bias.masked_fill(~allowed, float("-inf")))


def _key_positions(attention_mask, B, total, device):
    if attention_mask is None:
        return torch.arange(total, device=device).expand(B, total)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, :total]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token inside its document: 0 where the document index changes, then counting."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


def init_weights(model: Transformer, seed: int) -> None:
    """Initialise in place from `seed` alone: "normal" (OLMo 2: N(0, std) truncated at ±3σ for every
    linear and embedding) or "mitchell" (OLMo 1: 1/√d for inputs and embeddings, 1/√(2·fan_in·(layer+1))
    for the attention and MLP output projections, truncated at ±3σ)."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)

    def fill(weight: torch.Tensor, std: float) -> None:
        values = torch.empty(weight.shape, dtype=torch.float32)
        if c.init_truncate:
            nn.init.trunc_normal_(values, 0.0, std, -3 * std, 3 * std, generator=generator)
        else:
            nn.init.normal_(values, 0.0, std, generator=generator)
        with torch.no_grad():
            weight.copy_(values)

    mitchell = c.init == "mitchell"
    input_std = 1 / math.sqrt(c.d_model) if mitchell else c.init_std
    fill(model.embed.weight, input_std)
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        if isinstance(mlp, MoE):
            inputs, down = (mlp.router.weight, mlp.experts.gate_proj, mlp.experts.up_proj), mlp.experts.down_proj
        else:
            inputs, down = tuple(p.weight for p in (mlp.up_proj, mlp.gate_proj) if p is not None), mlp.down_proj.weight
        for weight in (block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight, *inputs):
            fill(weight, input_std)
        fill(block.attn.o_proj.weight, 1 / math.sqrt(2 * c.d_model * (i + 1)) if mitchell else c.init_std)
        fill(down, 1 / math.sqrt(2 * c.mlp_hidden_size * (i + 1)) if mitchell else c.init_std)
    if not c.tie_embeddings:
        fill(model.lm_head.weight, input_std)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, z_loss_multiplier: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy in fp32 over non-ignored labels, and z-loss = mult · logsumexp(logits)² when asked.

    With reduction="sum" the caller normalises (the trainer divides by the global batch's real tokens)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if not z_loss_multiplier:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction), None
    ce, z_loss = _CrossEntropyZLoss.apply(logits, labels, ignore_index, z_loss_multiplier)
    if reduction == "mean":
        count = (labels != ignore_index).sum().clamp(min=1)
        ce, z_loss = ce / count, z_loss / count
    return ce, z_loss


class _CrossEntropyZLoss(torch.autograd.Function):
    """Summed CE and z-loss from one log-softmax. The backward is one pass over the vocabulary instead of
    three (cross-entropy plus a separate logsumexp for the z-loss): 2.5x faster on CPU."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, multiplier):
        valid = labels != ignore_index
        targets = labels.masked_fill(~valid, 0)
        log_probs = torch.log_softmax(logits, dim=-1)
        # log_softmax = logits - lse, read at each row's largest logit: finite there even when other entries are
        # -inf (reading column 0 gives -inf - -inf = NaN when it is masked); cheaper than a second logsumexp.
        top, top_index = logits.max(dim=-1, keepdim=True)
        lse = (top - log_probs.gather(1, top_index)).squeeze(1)
        ce = torch.where(valid, -log_probs.gather(1, targets[:, None]).squeeze(1), 0.0).sum()
        z = multiplier * torch.where(valid, lse * lse, 0.0).sum()
        ctx.save_for_backward(log_probs, lse, targets, valid)
        ctx.multiplier = multiplier
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        # d/dlogits of (lse - x_target)·g_ce + mult·lse²·g_z = softmax·(g_ce + 2·mult·lse·g_z) - onehot·g_ce
        log_probs, lse, targets, valid = ctx.saved_tensors
        row_scale = torch.where(valid, grad_ce + 2 * ctx.multiplier * grad_z * lse, 0.0)
        grad = log_probs.exp().mul_(row_scale[:, None])
        grad.scatter_add_(1, targets[:, None], torch.where(valid, -grad_ce, 0.0)[:, None])
        return grad, None, None, None
