"""LeanModel: a Llama-family decoder forward with a preallocated KV cache and no per-token Python that can
be done once.

Built from a loaded model (float, or with :class:`~llmquant.modules.QuantLinear` layers) by reading its
modules through its :class:`~llmquant.models.ArchSpec` (data, no per-family code). What is done once,
at build: module lookups, kernel selection and preparation of every quantized linear, the RoPE table
(computed by the model's own rotary module, so every RoPE scaling variant is honoured), and the fusion of
q/k/v and gate/up into one kernel call each when their kernel can run them together (``Kernel.fuse``;
``packed_avx2``: one pass over the three packed buffers, nothing copied). What runs per token: embedding,
per layer two RMSNorms, three or four linear calls, RoPE, SDPA against the cache, the MLP, and the head on
the last position only. A decode step (one token for each sequence of a batch of up to 15) runs, where it can, as one C++ call
over all layers (:mod:`llmquant.runtime.compiled`; ``LLMQUANT_COMPILED_DECODE=0`` turns it off).

The weights are the model's own tensors (no copy); the model is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..models import arch_for, model_types_with
from ..modules import QuantEmbedding, QuantLinear
from ..modules.float_modules import FloatEmbedding, FloatLinear
from . import compiled as _compiled

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _get(root: nn.Module, path: str):
    m = root
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _one_linear(mod: nn.Module, dtype: torch.dtype):
    """A callable x -> y for one linear, with the kernel lookup done now."""
    if isinstance(mod, QuantLinear):
        return mod.runner(mod.qweight.device, dtype)
    if isinstance(mod, nn.Linear):
        w, b = mod.weight, mod.bias
        return lambda x: F.linear(x, w, b)
    if isinstance(mod, FloatLinear) and mod.weight.dtype != dtype and mod.weight.numel() * 4 > _UPCAST_KEPT_MAX:
        return _upcast_in_rows(mod.weight, mod.bias, dtype)  # an 8B model's bf16 head: no 2 GB fp32 copy kept
    return mod  # any other module that maps x -> y


_UPCAST_KEPT_MAX = 256 * 10**6  # bytes: a stored-bf16 linear larger than this in fp32 is upcast a block at a time


def _upcast_in_rows(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, rows: int = 8192):
    """x -> x @ w^T + b with ``w`` converted to ``dtype`` a block of rows per call (exact: every bf16/fp16
    value is an fp32 value), instead of a converted copy of the whole weight kept."""

    def f(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)
        for r in range(0, w.shape[0], rows):
            out[..., r:r + rows] = F.linear(x, w[r:r + rows].to(dtype), None if b is None else b[r:r + rows].to(dtype))
        return out

    return f


@dataclass
class LinearGroup:
    """Linears sharing an input as the lean runtime runs them: ``call`` x -> [y_1, ..., y_n], one kernel call
    (``fused``) when their kernel can fuse them (:meth:`~llmquant.kernels.Kernel.fuse`), else ``fns`` one by one."""

    mods: list[nn.Module]
    fns: list[Callable]
    fused: Callable | None

    @property
    def call(self) -> Callable:
        fns = self.fns
        return self.fused if self.fused is not None else (lambda x: [f(x) for f in fns])


def bind_group(mods: list[nn.Module], dtype: torch.dtype, fuse: bool = True) -> LinearGroup:
    fns = [_one_linear(m, dtype) for m in mods]
    fused = None
    if fuse and len(mods) > 1 and all(isinstance(m, QuantLinear) for m in mods):
        fused = QuantLinear.fused_runner(mods, mods[0].qweight.device, dtype)
    return LinearGroup(mods, fns, fused)


def bind_linears(mods: list[nn.Module], dtype: torch.dtype, fuse: bool = True):
    """A callable x -> [y_1, ..., y_n] for linears sharing an input (:class:`LinearGroup`'s ``call``)."""
    return bind_group(mods, dtype, fuse).call


@dataclass
class _Layer:
    in_w: torch.Tensor
    post_w: torch.Tensor
    qkv: object
    o: object
    gate_up: object
    down: object
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    # the modules behind the callables, for the compiled step
    qkv_group: LinearGroup
    gate_up_group: LinearGroup
    o_mod: nn.Module
    down_mod: nn.Module


class KVCache:
    """Keys and values of every layer, allocated once: (layers, batch, kv_heads, max_len, head_dim)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device="cpu"):
        self.k = torch.empty(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.max_len = max_len
        self.length = 0  # positions filled

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, eps)
    xf = x.float()  # as the reference implementations: normalise in fp32, scale in the model dtype
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


class LeanModel:
    """Callable as ``lean(ids, cache, key_mask=None) -> logits`` (last position, or every one with
    ``all_logits=True``); appends to ``cache``.

    ``compiled``: whether one-token steps (batches below ``compiled.MAX_BATCH``) run as one C++ call (built on the first such step;
    None: unless ``LLMQUANT_COMPILED_DECODE=0``). Where the step cannot be built, the Python path runs."""

    def __init__(self, model: nn.Module, *, fuse: bool = True, compiled: bool | None = None):
        arch = arch_for(model)
        cfg = getattr(model, "config", None)
        if arch is None or arch.runtime is None:
            raise UnsupportedModelError(
                f"the lean runtime runs Llama-family decoders ({', '.join(model_types_with('runtime'))}); this model "
                f"is {getattr(cfg, 'model_type', type(model).__name__)!r}: use the model's own generate()"
            )
        self.arch = arch
        layout, mods = arch.runtime, arch.modules
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        act = getattr(cfg, layout.act_attr, "silu")
        if act not in _ACTS:
            raise UnsupportedModelError(f"MLP activation {act!r} is not one the lean runtime knows ({', '.join(_ACTS)})")
        self.act, self.act_name = _ACTS[act], act
        self.window = getattr(cfg, layout.sliding_window_attr, None) if layout.sliding_window_attr else None
        embed = _get(model, arch.embed)
        norm = _get(model, arch.final_norm)
        self.final_w = norm.weight
        self.embed = embed.weight
        # a FloatEmbedding stores bf16/fp16 and returns fp32, and so does the model it is in; a QuantEmbedding
        # returns the dtype the rest of the model computes in (its norms')
        if isinstance(embed, QuantEmbedding):
            self.dtype = self.final_w.dtype
            self._lookup = lambda ids: embed.lookup(ids, self.dtype)  # the tokens' rows only
        else:
            stored = self.embed.dtype if self.embed.dtype.is_floating_point else torch.float32
            self.dtype = torch.float32 if isinstance(embed, FloatEmbedding) else stored
            self._lookup = lambda ids: F.embedding(ids, self.embed).to(self.dtype)
        self.device = self.embed.device
        self.rotary = _get(model, layout.rotary)
        if self.rotary is None:
            raise UnsupportedModelError(f"no rotary embedding module at {layout.rotary!r}")
        self.head_mod = _get(model, arch.lm_head)
        self.head = _one_linear(self.head_mod, self.dtype)
        self.layers: list[_Layer] = []
        for layer in _get(model, arch.layers):
            def g(path):
                return _get(layer, path)

            qn, kn = (g(p) if p else None for p in (mods.q_norm, mods.k_norm))
            qkv, gate_up = (bind_group([g(p) for p in paths], self.dtype, fuse) for paths in (mods.qkv, mods.gate_up))
            self.layers.append(
                _Layer(
                    in_w=g(mods.input_norm).weight,
                    post_w=g(mods.post_norm).weight,
                    qkv=qkv.call,
                    o=_one_linear(g(mods.o), self.dtype),
                    gate_up=gate_up.call,
                    down=_one_linear(g(mods.down), self.dtype),
                    q_norm=None if qn is None else qn.weight,
                    k_norm=None if kn is None else kn.weight,
                    qkv_group=qkv,
                    gate_up_group=gate_up,
                    o_mod=g(mods.o),
                    down_mod=g(mods.down),
                )
            )
        self.scale = self.head_dim**-0.5
        self._cos = self._sin = None
        self.compiled = _compiled.enabled_by_env() if compiled is None else compiled
        self._step = None  # the compiled step once built; False where it cannot be

    # ---- once per cache size --------------------------------------------------------------------
    @torch.inference_mode()
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.window and max_len > self.window:
            raise UnsupportedModelError(
                f"sequences of {max_len} tokens exceed this model's attention window ({self.window}); "
                "the lean runtime does full attention only: shorten the prompt or max_new_tokens"
            )
        self._rope_table(max_len)
        return KVCache(len(self.layers), batch, self.n_kv, max_len, self.head_dim, self.dtype, self.device)

    def _rope_table(self, n: int) -> None:
        if self._cos is not None and self._cos.shape[0] >= n:
            return
        pos = torch.arange(n, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self._cos, self._sin = cos[0], sin[0]  # (n, head_dim)

    # ---- per step ---------------------------------------------------------------------------------
    def compiled_step(self):
        """The compiled decode step (built on first use), or None where it cannot run this model."""
        if self._step is None:
            self._step = _compiled.build(self) or False
        return self._step or None

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache, key_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """``ids`` (B, T) appended at ``cache.length``. ``key_mask`` (B, max_len) bool marks real (non-pad)
        positions and ``positions`` (B, T) their RoPE positions; both None for unpadded batches."""
        b, t = ids.shape
        start = cache.length
        end = start + t
        if end > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions, {end} needed")
        # the compiled step takes positions and key mask as they are: the Python step's tables below are not made
        if t == 1 and b < _compiled.MAX_BATCH and cache.k.dtype == torch.float32 \
                and not torch.is_autocast_enabled(self.device.type):
            step = self.compiled_step()
            if step is not None:
                logits = step.step(self._lookup(ids), cache.k, cache.v, self._cos, self._sin, start,
                                   None if positions is None else positions.reshape(b),
                                   key_mask)
                cache.length = end
                return logits
        if positions is None:
            cos, sin = self._cos[start:end], self._sin[start:end]  # (T, hd), broadcast over batch and heads
        else:
            cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        if key_mask is not None:
            allowed = key_mask[:, None, None, :end]
            if t > 1 or start > 0:
                causal = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(start)
                allowed = allowed & causal
            mask, causal_flag = allowed, False
        elif t > 1 and start > 0:
            mask, causal_flag = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(start), False
        else:
            mask, causal_flag = None, t > 1
        h = self._lookup(ids)
        nh, nkv, hd, eps = self.n_heads, self.n_kv, self.head_dim, self.eps
        kc, vc = cache.k, cache.v
        gqa = nh != nkv
        for i, L in enumerate(self.layers):
            x = _rms(h, L.in_w, eps)
            q, k, v = L.qkv(x)
            q = q.view(b, t, nh, hd).transpose(1, 2)
            k = k.view(b, t, nkv, hd).transpose(1, 2)
            if L.q_norm is not None:
                q = _rms(q, L.q_norm, eps)
                k = _rms(k, L.k_norm, eps)
            kc[i, :, :, start:end] = _rotate(k, cos, sin)
            vc[i, :, :, start:end] = v.view(b, t, nkv, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(
                _rotate(q, cos, sin), kc[i, :, :, :end], vc[i, :, :, :end],
                attn_mask=mask, is_causal=causal_flag, scale=self.scale, enable_gqa=gqa,
            )
            h = h + L.o(a.transpose(1, 2).reshape(b, t, nh * hd))
            x = _rms(h, L.post_w, eps)
            gate, up = L.gate_up(x)
            h = h + L.down(self.act(gate) * up)
        cache.length = end
        if not all_logits:
            h = h[:, -1:]
        return self.head(_rms(h, self.final_w, eps))
