"""One readable Llama-family decoder: Vicuna-1.5, Mistral-7B and Nous-Hermes-2-Yi-34B differ by config only.

RMSNorm, rotate-half rotary embeddings with configurable theta, grouped-query attention, SiLU-gated MLP,
optional sliding window, untied ``lm_head``. Parameter names follow the Hugging Face Llama layout
(``layers.{i}.self_attn.q_proj`` …), whose q/k weights already use the rotate-half RoPE convention, so
those checkpoints load with a prefix change only.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from llavakit.core.attention import AttentionBackend
from llavakit.core.errors import ConfigError
from llavakit.core.hooks import hookimpl
from llavakit.core.inplace import Workspace, has_numba, runs_in_place
from llavakit.core.interfaces import LanguageModel
from llavakit.core.kv_cache import KVCache


#: Attention backends whose CPU decode steps may run as the fused numba layer: the built-in ones that compute
#: plain softmax attention. ``eager`` stays the reference math, and a plugin's backend is never bypassed.
FUSED_BACKENDS = frozenset({"sdpa", "flash"})
#: CPU forwards over at least this many positions, with no gradient wanted, run the layers into reused buffers
#: (:mod:`llavakit.core.inplace`); shorter ones allocate temporaries too small to cost page faults.
IN_PLACE_MIN_POSITIONS = 32


class LlamaConfig(BaseModel):
    """Options of the ``llama`` decoder (presets override a subset)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @model_validator(mode="after")
    def _check_heads(self) -> LlamaConfig:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, exactly as the reference does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def normalise_into(self, x: torch.Tensor, work: Workspace, name: str) -> torch.Tensor:
        """:meth:`forward` into ``work`` buffers: the same operations in the same order, so the same bits."""
        dtype, shape = x.dtype, tuple(x.shape)
        if self.weight.dtype != dtype:  # the scaling promotes: nothing to gain in place
            return self.forward(x)
        if dtype != torch.float32:
            x = work("norm_float", shape, torch.float32).copy_(x)
        squares = torch.pow(x, 2, out=work("norm_squares", shape, torch.float32))
        scale = squares.mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        normed = torch.mul(x, scale, out=squares)
        out = normed if dtype == torch.float32 else work(name, shape, dtype).copy_(normed)
        return out.mul_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, computed per call from the position ids (no length limit).

    The inverse frequencies are derived data, not state: they are kept off the state dict and computed on
    the CPU even when the model is built on the meta device, so a meta-built model needs no re-init.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self._inv_freq = {torch.device("cpu"): 1.0 / (theta**exponents)}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def rotary_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                scratch: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` written into ``out`` (``scratch`` holds the rotated half times ``sin``): the same
    roundings, since ``(-a) * b`` is exactly ``-(a * b)``, without its five temporaries."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    torch.mul(x[..., half:], sin[..., :half], out=scratch[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=scratch[..., half:])
    return out.add_(scratch)


def linear_into(x: torch.Tensor, linear: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for ``[B, L, C]`` ``x`` into the ``[B * L, N]`` buffer ``out`` (the product ``F.linear`` runs,
    so the same bits), returned as ``[B, L, N]``."""
    b, l, _ = x.shape
    return torch.mm(x.reshape(b * l, -1), linear.weight.t(), out=out).view(b, l, -1)


def project_into(projection: Projection, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A numba-packed :class:`Projection` (float32 blocks) applied to ``[B, L, C]`` ``x`` by the many-row kernel
    (:func:`llavakit.core.gemv.matmul`) into the ``[B * L, N]`` buffer ``out``, returned as ``[B, L, N]``."""
    from llavakit.core.gemv import matmul

    b, l, _ = x.shape
    return matmul(projection.matrix, x.reshape(b * l, -1), out).view(b, l, -1)


def last_rows(keep: int, x, cos, sin, mask, causal):
    """The queries' side of an attention layer cut to its last ``keep`` positions (all of it for 0): the inputs,
    rotary tables and mask rows; causality stays bottom-right aligned, and one last query sees every key."""
    if not keep:
        return x, cos, sin, mask, causal
    return (x[:, -keep:], cos[:, :, -keep:], sin[:, :, -keep:], None if mask is None else mask[:, :, -keep:],
            causal and keep > 1)


def heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads * D]`` as ``[B, heads, L, D]`` (a view, as the projections' outputs are used)."""
    b, l, _ = x.shape
    return x.view(b, l, heads, -1).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.layer = layer
        self.backend = backend
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, mask, causal, kv_cache: KVCache | None, keep: int = 0):
        """Attention output for every position, or with ``keep`` only for the last ``keep`` (queries and ``o_proj``
        run on those rows alone; every position's keys and values still go to the cache)."""
        b, l, _ = x.shape
        k = self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        x, cos, sin, mask, causal = last_rows(keep, x, cos, sin, mask, causal)
        q = self.q_proj(x).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        out = self.backend.attend(q, k, v, mask=mask, causal=causal, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, x.shape[1], -1))

    def forward_in_place(self, x, work: Workspace, cos, sin, mask, causal, kv_cache: KVCache | None, keep: int = 0,
                         products: tuple[Projection, ...] | None = None):
        """:meth:`forward` into ``work`` buffers: the same results, bit for bit, unless ``products`` (the layer's
        numba-packed float32 projections, q/k/v together, then o) run the products (equal to rounding)."""
        b, l, _ = x.shape
        dtype, kv_width, q_width = x.dtype, self.num_kv_heads * self.head_dim, self.num_heads * self.head_dim
        if products is not None:
            qkv = project_into(products[0], x, work("qkv", (b * l, q_width + 2 * kv_width), dtype))
            queries, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        else:
            k = linear_into(x, self.k_proj, work("k", (b * l, kv_width), dtype))
            v = linear_into(x, self.v_proj, work("v", (b * l, kv_width), dtype))
        k, v = heads_view(k, self.num_kv_heads), heads_view(v, self.num_kv_heads)
        k_rotated = heads_view(work("k_rotated", (b, l, kv_width), dtype), self.num_kv_heads)
        k_scratch = heads_view(work("k_scratch", (b, l, kv_width), dtype), self.num_kv_heads)
        k = rotary_into(k, cos, sin, k_rotated, k_scratch)
        x, cos, sin, mask, causal = last_rows(keep, x, cos, sin, mask, causal)
        lq = x.shape[1]
        if products is not None:
            q = heads_view(queries[:, -keep:] if keep else queries, self.num_heads)
        else:
            q = heads_view(linear_into(x, self.q_proj, work("q", (b * lq, q_width), dtype)), self.num_heads)
        q_rotated = heads_view(work("q_rotated", (b, lq, q_width), dtype), self.num_heads)
        q_scratch = heads_view(work("q_scratch", (b, lq, q_width), dtype), self.num_heads)
        q = rotary_into(q, cos, sin, q_rotated, q_scratch)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        out = self.backend.attend(q, k, v, mask=mask, causal=causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, lq, -1)
        buffer = work("out", (b * lq, self.o_proj.out_features), dtype)
        return project_into(products[1], out, buffer) if products is not None else linear_into(out, self.o_proj, buffer)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_in_place(self, x, work: Workspace, products: tuple[Projection, ...] | None = None):
        """:meth:`forward` into ``work`` buffers: the same results, bit for bit, unless ``products`` (numba-packed
        float32 gate/up together, then down) run the products (equal to rounding)."""
        rows, width = x.shape[0] * x.shape[1], self.gate_proj.out_features
        out = work("out", (rows, self.down_proj.out_features), x.dtype)
        if products is not None:
            gate, up = project_into(products[0], x, work("gate_up", (rows, 2 * width), x.dtype)).split(width, dim=-1)
            return project_into(products[1], F.silu(gate, inplace=True).mul_(up), out)
        gate = linear_into(x, self.gate_proj, work("gate", (rows, width), x.dtype))
        up = linear_into(x, self.up_proj, work("up", (rows, width), x.dtype))
        return linear_into(F.silu(gate, inplace=True).mul_(up), self.down_proj, out)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Attention(config, layer, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, causal, kv_cache, keep: int = 0):
        """The layer's output for every position, or with ``keep`` for the last ``keep`` positions only."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, kv_cache, keep)
        x = (x[:, -keep:] if keep else x) + attended
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_in_place(self, x, work: Workspace, cos, sin, mask, causal, kv_cache, keep: int = 0,
                         products: tuple[Projection, ...] | None = None):
        """:meth:`forward` with ``x`` (a buffer of the caller's) updated in place and every temporary in ``work``;
        ``products``: the layer's numba-packed projections (:meth:`LlamaDecoder.prefill_products`), or ``None``."""
        attended = self.self_attn.forward_in_place(self.input_layernorm.normalise_into(x, work, "normed"), work,
                                                   cos, sin, mask, causal, kv_cache, keep,
                                                   None if products is None else products[:2])
        x = (x[:, -keep:] if keep else x).add_(attended)
        normed = self.post_attention_layernorm.normalise_into(x, work, "normed")
        return x.add_(self.mlp.forward_in_place(normed, work, None if products is None else products[2:]))


class LlamaDecoder(LanguageModel):
    """The Llama-family decoder. Submodules: ``embed_tokens``, ``layers``, ``norm``, ``lm_head``."""

    def __init__(self, config: LlamaConfig, *, attention: AttentionBackend):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.max_position_embeddings = config.max_position_embeddings
        self.sliding_window = config.sliding_window
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, attention) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def reset_parameters(self) -> None:
        """Documented random init: normal(0, initializer_range) for linear and embedding weights, norms at 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def _mask(self, attention_mask, q_len: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
        """Combine causality, padding and the sliding window into one boolean mask (or a plain causal flag).

        A ``[B, 1, q_len, k_len]`` mask is the caller's whole attention pattern (a packed sequence's tree, say)
        and is used as given; where the sliding window would cut in, it is refused (the window counts positions,
        which such a mask does not state).
        """
        k_len = past + q_len
        needs_window = self.sliding_window is not None and k_len > self.sliding_window
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape[1:] != (1, q_len, k_len) or attention_mask.dtype != torch.bool:
                raise ConfigError(
                    f"a 4-D attention_mask must be boolean [batch, 1, {q_len}, {k_len}] (queries × every key, "
                    f"True where attention is allowed), got {attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            if needs_window:
                raise ConfigError(
                    f"a 4-D attention_mask over {k_len} keys meets the sliding window of {self.sliding_window}: "
                    "the window counts positions, which such a mask does not state; fold the window into the mask "
                    "and pass the sequence in pieces no longer than the window, or set sliding_window to null"
                )
            return attention_mask, False
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and not needs_window:
            # Decode steps see every cached key; a fresh prefill is plain causal.
            return None, q_len > 1
        q_pos = torch.arange(past, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if needs_window:
            allowed = allowed & (k_pos > q_pos - self.sliding_window)
        allowed = allowed[None, None]
        if padded:
            allowed = allowed & attention_mask[:, None, None, :k_len].bool()
            # A padding query would see no key at all (NaN softmax); let it see itself. Nothing reads it.
            allowed = allowed | (k_pos == q_pos)[None, None]
        return allowed, False

    #: Whether long CPU forwards without gradients may run their layers into reused buffers
    #: (see :meth:`runs_in_place`).
    in_place: bool = True
    #: Whether single-token steps may use prepacked copies of the weights (CPU only; see :class:`DecodeWeights`).
    pack_decode_weights: bool = True

    def decode_step(self, tokens, *, position_ids, attention_mask, kv_cache):
        """One token per row, with the weights of :class:`DecodeWeights` and no per-step allocation beyond
        activations. Same math as :meth:`forward`; with grad enabled on trainable weights it is :meth:`forward`."""
        return self._step(tokens, position_ids, attention_mask, kv_cache, greedy=False)

    def decode_greedy(self, tokens, *, position_ids, attention_mask, kv_cache):
        """:meth:`decode_step`'s argmax; on the one-kernel path the kernel picks it, and no logits are written out."""
        return self._step(tokens, position_ids, attention_mask, kv_cache, greedy=True)

    def _step(self, tokens, position_ids, attention_mask, kv_cache: KVCache, *, greedy: bool) -> torch.Tensor:
        if torch.is_grad_enabled() and self.lm_head.weight.requires_grad:
            logits = super().decode_step(tokens, position_ids=position_ids, attention_mask=attention_mask,
                                         kv_cache=kv_cache)
            return logits.argmax(dim=-1) if greedy else logits
        batch = tokens.shape[0]
        weights = self._step_weights(batch, kv_cache)
        fast = weights.fused is not None or weights.norms is not None
        starts = None
        if fast and self.layers[0].self_attn.backend.name in FUSED_BACKENDS:
            starts = self._attended_from(attention_mask, batch, kv_cache.length + 1)
        if starts is not None and weights.fused is not None:
            return self._fused_step(tokens, position_ids, weights, kv_cache, starts, greedy=greedy)
        logits = self._unfused_step(tokens, position_ids, attention_mask, kv_cache, weights, starts)
        return logits.argmax(dim=-1) if greedy else logits

    def _step_weights(self, batch_size: int, kv_cache: KVCache) -> DecodeWeights:
        """:meth:`decode_weights` for steps on ``kv_cache``, checked against the parameters on its first step
        only: with the CPU caches cold from streaming the weights, the check cost 0.2 ms of a 3-4 ms step. So a
        parameter changed between two steps on one cache (not between generations) is not seen by those steps."""
        # Keyed by the step's batch size, not the weights' own: weights packed for another batch size fit this one
        # too (except MKL's), and comparing with theirs re-ran the check on every step of such a cache.
        checked = kv_cache.views.get("decode_weights")
        if checked is None or checked[1] != batch_size:
            checked = kv_cache.views["decode_weights"] = (self.decode_weights(batch_size), batch_size)
        return checked[0]

    def _unfused_step(self, tokens, position_ids, attention_mask, kv_cache: KVCache, weights: DecodeWeights,
                      starts: np.ndarray | None) -> torch.Tensor:
        """The step as PyTorch operators on the packed projections, or (``starts`` given) with numba kernels
        between them."""
        config = self.config
        batch, heads, kv_heads, head_dim = tokens.shape[0], config.num_heads, config.num_kv_heads, config.head_dim
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(position_ids, x.dtype)
        cos, sin = cos[:, :, 0], sin[:, :, 0]  # [B, 1, head_dim]: one position, broadcast over heads
        if starts is not None:
            return self._glued_step(x, cos, sin, weights, kv_cache, starts)
        mask, _ = self._mask(attention_mask, 1, kv_cache.length, x.device)
        # Without a mask, the query heads sharing a key/value head become that head's queries: grouped-query
        # attention with no copy of the cache (a mask is per query position, so masked steps keep Hq heads).
        query_shape = (batch, kv_heads, heads // kv_heads, head_dim) if mask is None else (batch, heads, 1, head_dim)
        for index, (layer, projections) in enumerate(zip(self.layers, weights.layers)):
            qkv, output, gate_up, down = projections
            attention = layer.self_attn
            q, k, v = qkv(layer.input_layernorm(x))
            q = apply_rotary(q.view(batch, heads, head_dim), cos, sin)
            k = apply_rotary(k.view(batch, kv_heads, 1, head_dim), cos[:, :, None], sin[:, :, None])
            keys, values = kv_cache.update(index, k, v.view(batch, kv_heads, 1, head_dim))
            out = attention.backend.attend(q.view(query_shape), keys, values, mask=mask, causal=False, scale=attention.scale)
            x = x + output(out.reshape(batch, heads * head_dim))[0]
            gate, up = gate_up(layer.post_attention_layernorm(x))
            x = x + down(F.silu(gate) * up)[0]
        kv_cache.advance(1)
        return weights.lm_head(self.norm(x))[0]

    def _attended_from(self, attention_mask, batch: int, k_len: int) -> np.ndarray | None:
        """Each row's first attended cache position (int64 ``[B]``) when the mask of a decode step is plain left
        padding (every position from the first attended one on is attended), which the numba paths handle;
        ``None`` for any other mask or a sliding window that cuts in, which go through the general path."""
        if self.sliding_window is not None and k_len > self.sliding_window:
            return None
        if attention_mask is None:
            return np.zeros(batch, dtype=np.int64)
        if attention_mask.dim() != 2:
            return None
        attended = attention_mask[:, :k_len].bool()
        # The first attended position of each row, and whether everything after it is attended too.
        starts = torch.where(attended.any(1), attended.int().argmax(1), k_len - 1)
        if int(attended.sum()) != int((k_len - starts).sum()):
            return None
        return starts.cpu().numpy().astype(np.int64)

    @staticmethod
    def _cache_arrays(kv_cache: KVCache) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """The per-layer cache arrays the numba kernels write (made once per cache), after checking there is room
        for the step."""
        from llavakit.plugins.llama_kernels import as_cache_array

        kv_cache.check_room(1)
        arrays = kv_cache.views.get("numba")
        if arrays is None:
            arrays = kv_cache.views["numba"] = (tuple(as_cache_array(k) for k in kv_cache.keys),
                                                tuple(as_cache_array(v) for v in kv_cache.values))
        return arrays

    def _rotary_rows(self, kv_cache: KVCache, position_ids: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float32 cos/sin tables (``[N, head_dim]``, in ``dtype``'s values) and each row's index into them for a
        step at ``position_ids`` (``[B, 1]``). The tables cover the positions from this step's on up to the
        cache's capacity and are made once per cache, by the same operators the per-step path runs (the same
        values, bit for bit); a position outside them makes them anew."""
        positions = position_ids[:, 0].to(torch.int64).cpu().numpy()
        low, high = int(positions.min()), int(positions.max())
        table = kv_cache.views.get("rotary")
        if table is None or table[1] != dtype or low < table[0] or high >= table[0] + table[2].shape[0]:
            span = torch.arange(low, max(high + 1, kv_cache.capacity))[:, None]
            cos, sin = self.rotary(span, dtype)  # [N, 1, 1, head_dim]
            table = kv_cache.views["rotary"] = (low, dtype, cos[:, 0, 0].float().contiguous().numpy(),
                                                sin[:, 0, 0].float().contiguous().numpy())
        return table[2], table[3], positions - table[0]

    def _fused_step(self, tokens, position_ids, weights: DecodeWeights, kv_cache: KVCache, starts: np.ndarray, *,
                    greedy: bool) -> torch.Tensor:
        """The whole step as one numba kernel (:func:`llavakit.plugins.llama_kernels.decode_tokens`), rows
        attending from ``starts``: the logits, or with ``greedy`` each row's argmax."""
        from llavakit.core.gemv import as_matrix
        from llavakit.core.gemv import kernel_threads
        from llavakit.plugins.llama_kernels import decode_tokens

        keys, values = self._cache_arrays(kv_cache)
        dtype = self.lm_head.weight.dtype
        cos, sin, rows = self._rotary_rows(kv_cache, position_ids, dtype)
        ids = tokens.to(torch.int64).cpu().numpy()
        batch = tokens.shape[0]
        logits = torch.empty(0 if greedy else batch, self.vocab_size, dtype=dtype)
        best = torch.empty(batch if greedy else 0, dtype=torch.int64)
        with kernel_threads():
            bad = decode_tokens(ids, rows, starts, weights.embedding, weights.fused, keys, values, weights.final_norm,
                                weights.lm_head.matrix, cos, sin, dtype == torch.bfloat16,
                                np.float32(self.config.rms_norm_eps), np.float32(self.layers[0].self_attn.scale),
                                self.config.num_heads, kv_cache.length, as_matrix(logits), best.numpy(),
                                weights.lm_head_screen)
        if bad >= 0:
            raise IndexError(f"token id {int(ids[bad])} of row {bad} is outside the vocabulary of "
                             f"{self.vocab_size} ids; only ids 0 to {self.vocab_size - 1} can be decoded")
        kv_cache.advance(1)
        return best if greedy else logits

    def _glued_step(self, x, cos, sin, weights: DecodeWeights, kv_cache: KVCache, starts: np.ndarray) -> torch.Tensor:
        """A batch too large for the one-kernel step: per layer four packed oneDNN products, and between them three
        numba kernels for the norms and residuals, rotary, the cache write and attention, and the gated activation
        (:mod:`llavakit.plugins.llama_kernels`), rows attending from ``starts``."""
        from llavakit.core.gemv import as_matrix, kernel_threads
        from llavakit.plugins.llama_kernels import attend_rows, residual_norm, silu_gate

        keys, values = self._cache_arrays(kv_cache)
        cos, sin = cos[:, 0].float().contiguous().numpy(), sin[:, 0].float().contiguous().numpy()
        config, dtype = self.config, x.dtype
        bf16, batch, eps = dtype == torch.bfloat16, x.shape[0], np.float32(config.rms_norm_eps)
        scale = np.float32(self.layers[0].self_attn.scale)
        state = x.to(torch.float32, copy=True).numpy()
        hidden = torch.empty_like(x)
        attended = x.new_empty(batch, config.num_heads * config.head_dim)
        activated = x.new_empty(batch, config.intermediate_size)
        hidden_words, attended_words, activated_words = as_matrix(hidden), as_matrix(attended), as_matrix(activated)
        no_delta = hidden_words[:0]
        norms = weights.norms
        with kernel_threads():
            residual_norm(state, no_delta, norms[0], eps, bf16, hidden_words)
            for index, (qkv, output, gate_up, down) in enumerate(weights.layers):
                qkv_words = as_matrix(qkv.product(hidden))
                attend_rows(qkv_words, bf16, scale, config.num_heads, kv_cache.length, starts, cos, sin, keys[index],
                            values[index], attended_words)
                residual_norm(state, as_matrix(output.product(attended)), norms[2 * index + 1], eps, bf16, hidden_words)
                silu_gate(as_matrix(gate_up.product(hidden)), bf16, activated_words)
                residual_norm(state, as_matrix(down.product(activated)), norms[2 * index + 2], eps, bf16, hidden_words)
        kv_cache.advance(1)
        return weights.lm_head.product(hidden)

    def decode_weights(self, batch_size: int) -> DecodeWeights:
        """The cached :class:`DecodeWeights`, rebuilt when a parameter changed or (MKL packing) the batch did."""
        cached = getattr(self, "_decode_weights", None)
        if cached is None or not cached.fits(self, batch_size):
            self._decode_weights = None  # free the old copies before packing new ones
            cached = self._decode_weights = DecodeWeights(self, batch_size)
        return cached

    def release_decode_weights(self) -> None:
        """Free the packed weight copies (they are rebuilt on the next generation step)."""
        self._decode_weights = None

    def __getstate__(self):
        # Packed copies are derived data in opaque layouts: never pickled or deep-copied, rebuilt on demand.
        state = dict(super().__getstate__())
        state.pop("_decode_weights", None)
        return state

    def forward(self, inputs_embeds, *, position_ids, attention_mask=None, kv_cache=None, keep_last=0):
        """See :meth:`LanguageModel.forward`. With ``keep_last`` the last layer runs its queries, attention output
        and MLP for those positions only: a prefill that needs one position's logits skips nearly a whole layer
        (the positions' keys and values, which the cache needs, come from the layer before)."""
        past = kv_cache.length if kv_cache is not None else 0
        x = inputs_embeds
        length = x.shape[1]
        cos, sin = self.rotary(position_ids, x.dtype)
        mask, causal = self._mask(attention_mask, length, past, x.device)
        keep = keep_last if 0 < keep_last < length else 0
        last = len(self.layers) - 1
        if self.runs_in_place(x):
            work = Workspace(x.device)
            products = self.prefill_products(x, kv_cache)
            x = work("residual", tuple(x.shape), x.dtype).copy_(x)
            for index, layer in enumerate(self.layers):
                x = layer.forward_in_place(x, work, cos, sin, mask, causal, kv_cache, keep if index == last else 0,
                                           None if products is None else products[index])
        else:
            for index, layer in enumerate(self.layers):
                x = layer(x, cos, sin, mask, causal, kv_cache, keep if index == last else 0)
        if kv_cache is not None:
            kv_cache.advance(length)
        return self.norm(x)

    def runs_in_place(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs its layers into a :class:`Workspace`: CPU inputs of at least
        ``IN_PLACE_MIN_POSITIONS`` positions, no gradient wanted, no forward hook to call (the layers' in-place
        methods call no submodule), and :attr:`in_place` left on."""
        return self.in_place and runs_in_place(x, self.layers, IN_PLACE_MIN_POSITIONS)

    def prefill_products(self, x: torch.Tensor, kv_cache: KVCache | None) -> list[tuple[Projection, ...]] | None:
        """Each layer's numba-packed float32 projections (:class:`DecodeWeights`), for a generation's prefill
        (a forward with a cache) that :meth:`runs_in_place`, in float32, where the steps after it will use them
        (``packing == "numba"``): the many-row kernel (:func:`llavakit.core.gemv.matmul`) runs float32 products
        1.3-1.6x faster than MKL here. Otherwise ``None``: the products stay ``torch.mm`` (a plain forward never
        makes packed copies for itself). The first such prefill packs the weights, as the first step would."""
        if kv_cache is None or x.dtype != torch.float32 or not self.pack_decode_weights:
            return None
        weights = self._step_weights(x.shape[0], kv_cache)
        return weights.layers if weights.packing == "numba" else None

    def logits(self, hidden):
        return self.lm_head(hidden)


class Projection:
    """``x ↦ (x W₁ᵀ, x W₂ᵀ, …)`` for weights that share their input, as one matrix product when packed.

    Packing (CPU): the weights are concatenated and reordered once into the layout of the BLAS that runs
    them fastest for few rows: MKL's packed GEMM for float32 at batch 1 (packed for that batch size, the only
    one it then runs), oneDNN's blocked layout otherwise. Measured on 2 Zen 4 cores, such products read the
    weights 1.6-2x faster than ``F.linear`` reads the plain ones (batch 1 to 8, float32 and bfloat16).
    Unpacked, it runs ``F.linear`` on the parameters themselves (no copy).
    """

    def __init__(self, weights: list[torch.Tensor], packing: str | None, batch_size: int):
        self.sizes = [w.shape[0] for w in weights]
        self.packing = packing
        if packing is None:
            self.weights = weights
            return
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        if packing == "numba":
            from llavakit.core.gemv import as_matrix, fast_layout, gemv

            self.gemv = gemv
            self.matrix = fast_layout(as_matrix(weight))
            return
        if packing == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_size)
            # The op falls back to its plain-weight argument only for another batch size, which never runs here.
            self.unused_plain = weight.new_empty(()).expand(weight.shape)
            self.batch_size = batch_size
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.packing is None:
            return tuple(F.linear(x, w) for w in self.weights)
        y = self.product(x)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The packed product, every weight's outputs side by side in one contiguous ``[B, sum(sizes)]``."""
        if self.packing == "numba":
            return self.gemv(self.matrix, x)
        if self.packing == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.packed, self.unused_plain, None, self.batch_size)
        if self.packing is None:
            raise RuntimeError("an unpacked Projection keeps its weights apart; call it instead")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class DecodeWeights:
    """Per-layer projections (q/k/v together, output, gate/up together, down) and ``lm_head`` for decode steps;
    on the numba path also ``fused``, each layer's matrices and norm weights for the one-call step kernel, with
    the embedding table and the final norm's weights.

    Packed copies cost as much memory as the decoder's linear weights, so they are made only on the CPU, when
    ``LlamaDecoder.pack_decode_weights`` is true and the copies take less than half the memory available
    now; otherwise every projection runs on the parameters directly. A fingerprint of the parameters
    (storage and version) detects any change (an optimizer step, ``load_state_dict``, ``.to()``).
    """

    def __init__(self, decoder: LlamaDecoder, batch_size: int):
        self.batch_size = batch_size
        self.slots = parameter_slots(decoder)
        self.fingerprint = parameter_fingerprint(self.slots)
        self.wanted = packing_kind(decoder, batch_size)
        self.packing = self.wanted if self.wanted is not None and packed_copies_fit(decoder) else None
        project = lambda *weights: Projection(list(weights), self.packing, batch_size)  # noqa: E731
        self.layers = [
            (
                project(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight),
                project(layer.self_attn.o_proj.weight),
                project(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight),
                project(layer.mlp.down_proj.weight),
            )
            for layer in decoder.layers
        ]
        self.lm_head = project(decoder.lm_head.weight)
        # The numba path also runs whole layers as one kernel: the same matrices, plus the norm weights. Packed
        # oneDNN/MKL products get numba kernels between them (``norms``: each layer's input and post-attention
        # norm, then the final one, in the order a step applies them).
        self.fused = self.norms = None
        norm = lambda module: module.weight.detach().to(torch.float32, copy=True).numpy()  # noqa: E731
        if self.packing == "numba" and decoder.embed_tokens.weight.dtype == decoder.lm_head.weight.dtype:
            from llavakit.core.gemv import as_matrix

            # Tuples, which numba takes as they are (a list would be converted on every call).
            self.fused = tuple(
                (norm(layer.input_layernorm), qkv.matrix, output.matrix, norm(layer.post_attention_layernorm),
                 gate_up.matrix, down.matrix)
                for layer, (qkv, output, gate_up, down) in zip(decoder.layers, self.layers)
            )
            self.embedding = as_matrix(decoder.embed_tokens.weight)  # a view of the parameter, no copy
            self.final_norm = norm(decoder.norm)
            self.lm_head_screen = screen_arrays(decoder.lm_head.weight)
        elif self.packing in ("onednn", "mkl") and decoder.lm_head.weight.dtype in (torch.float32, torch.bfloat16) \
                and has_numba():
            self.norms = [norm(layer.input_layernorm) for layer in decoder.layers[:1]]
            for index, layer in enumerate(decoder.layers):
                following = decoder.layers[index + 1].input_layernorm if index + 1 < len(decoder.layers) else decoder.norm
                self.norms += [norm(layer.post_attention_layernorm), norm(following)]

    def fits(self, decoder: LlamaDecoder, batch_size: int) -> bool:
        """Still valid for ``batch_size`` steps of ``decoder`` as it is now."""
        return (
            self.fingerprint == parameter_fingerprint(self.slots)
            and self.wanted == packing_kind(decoder, batch_size)
            and (self.packing != "mkl" or batch_size == self.batch_size)
        )


def screen_arrays(weight: torch.Tensor) -> tuple[np.ndarray, ...]:
    """What the step kernel takes for greedy steps: an :class:`~llavakit.core.gemv.ArgmaxScreen` of ``weight``
    (``lm_head``) as its codes and stats, with scratch for :func:`~llavakit.core.gemv.screened_argmax` for a
    group of rows (kept here, so a step allocates nothing); empty arrays where this CPU or these weights allow
    no screen."""
    from llavakit.core.gemv import GROUP, ArgmaxScreen

    screen = ArgmaxScreen.build(weight)
    if screen is None:
        return np.zeros((0, 1, 16, 4), np.int8), np.zeros((5, 0)), np.zeros((0, 0)), np.zeros((0, 0))
    return (screen.codes, screen.stats, *screen.scratch(GROUP))


def parameter_slots(module: nn.Module) -> list[tuple[dict, str]]:
    """Every (owning module's parameter dict, name) of ``module``'s parameters: walking the module tree once, so
    a per-step check reads the current parameters without walking it again (which cost ~1 ms a step)."""
    return [(owner._parameters, name) for owner in module.modules() for name, _ in owner.named_parameters(recurse=False)]


def parameter_fingerprint(slots: list[tuple[dict, str]]) -> tuple:
    """Storage and version of each slot's current parameter: changes with any in-place update, ``.to()``,
    ``load_state_dict`` or a replaced parameter. Read from the parameter dicts directly: through the modules'
    ``__getattr__`` this check cost 0.2-0.3 ms of a 4 ms decode step."""
    parameters = [owner.get(name) for owner, name in slots]
    return tuple((None, None) if p is None else (p.data_ptr(), p._version) for p in parameters)


def packing_kind(decoder: LlamaDecoder, batch_size: int) -> str | None:
    """``"numba"``, ``"mkl"``, ``"onednn"`` or ``None``: the fastest path this CPU offers for the dtype and batch
    size. float32 and bfloat16 steps up to :func:`_numba_batch_limit` rows go to :mod:`llavakit.core.gemv`'s
    kernels (at batch 1, 1.5-2x the weight bandwidth of MKL and oneDNN) when numba is installed."""
    weight = decoder.lm_head.weight
    if not decoder.pack_decode_weights or weight.device.type != "cpu":
        return None
    if weight.dtype in (torch.float32, torch.bfloat16) and has_numba() and batch_size <= _numba_batch_limit(weight.dtype):
        return "numba"
    mkl = weight.dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    onednn = torch.backends.mkldnn.is_available() and (
        weight.dtype == torch.float32
        or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        or (weight.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported())
    )
    if mkl and (batch_size == 1 or not onednn):
        return "mkl"
    return "onednn" if onednn else None


@functools.cache
def _numba_batch_limit(dtype: torch.dtype) -> int:
    """The largest batch whose steps run as the one numba kernel: a group of rows sharing every weight load
    (:data:`~llavakit.core.gemv.GROUP`) where the weights are blocked (float32, or bf16 on a CPU with bf16 dot
    products), else batch 1; larger batches go to oneDNN, whose products then do more work per load."""
    from llavakit.core.gemv import BF16_DOT, GROUP

    return GROUP if dtype == torch.float32 or BF16_DOT else 1


def packed_copies_fit(decoder: LlamaDecoder) -> bool:
    """Whether packed copies of the linear weights (with an int8 screen of ``lm_head``) take less than half the
    memory available now."""
    needed = sum(p.numel() * p.element_size() for name, p in decoder.named_parameters() if name.endswith("proj.weight"))
    needed += decoder.lm_head.weight.numel() * (decoder.lm_head.weight.element_size() + 1)
    available = available_memory()
    return available is None or needed < available / 2


def available_memory() -> int | None:
    """Bytes of memory available now, page cache included (Linux ``MemAvailable``; else free pages), or
    ``None`` where the OS does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _presets() -> dict:
    return json.loads(resources.files("llavakit.plugins").joinpath("presets/llms.json").read_text())


@hookimpl
def register_language_models(register):
    register(
        "llama",
        LlamaDecoder,
        config=LlamaConfig,
        description="configurable Llama-family decoder (RMSNorm, RoPE, GQA, SiLU MLP, optional sliding window)",
    )
    for name, preset in _presets().items():
        register(
            name,
            LlamaDecoder,
            config=LlamaConfig,
            defaults=preset["options"],
            description=preset["description"],
            **preset["metadata"],
        )
