"""FakeQuantLinear: a float linear whose forward sees its weights (and inputs) quantized, for QAT.

Straight-through estimator (Bengio et al., 2013, "Estimating or propagating gradients through stochastic
neurons"): the forward rounds, the backward treats ``round`` as the identity,
``d round(v) / dv := 1``, while ``clamp`` keeps its true gradient (1 inside the grid, 0 outside).

Learned step size (LSQ, Esser et al., 2019, "Learned Step Size Quantization", ICLR 2020): with
``v_hat = (clamp(round(v / s) + z, qmin, qmax) - z) * s`` the STE gives

    d v_hat / d s = round(v/s) - v/s   inside the grid,   (qmin or qmax) - z   outside,

and the step's gradient is multiplied by ``g = 1 / sqrt(N * qmax)``, N the number of values sharing
that step (the group size for grouped weights, the row for per channel, the features for activations),
so steps and values learn at comparable rates. Zero points of asymmetric schemes are learned the same way
(LSQ+, Bhalgat et al., 2020): ``d v_hat / d z = 0`` inside the grid and ``-s`` where the value is clipped.
The grid and qparams follow :mod:`llmquant.schemes.primitives` exactly (same operations in the same
order), so :func:`llmquant.flows.qat.convert_qat` gives packed modules whose dequantized weight equals the
fake-quantized one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..schemes import QuantScheme, compute_qparams, expand_groups
from ..schemes.primitives import EPS, group_sum, range_qparams, scale_torch_dtype


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward (bit-exact), gradient multiplied by ``g`` backward (LSQ's step-size gradient scaling)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (and back to float32) forward, identity backward."""
    if dtype == torch.float32:
        return x
    return x + (x.to(dtype).float() - x).detach()


def _reduce_groups(g: torch.Tensor, shape: torch.Size, scheme: QuantScheme) -> torch.Tensor:
    """Sum a per-value gradient (rows, K) back onto the (rows, groups) or (1, 1) qparams it came from."""
    return group_sum(g, shape[1], scheme)


@torch.no_grad()
def mse_qparams(x: torch.Tensor, scheme: QuantScheme, shrinks: int = 16, lowest: float = 0.5):
    """Per-(row, group) qparams of the range ``[a * min, a * max]`` whose round trip has the least squared
    error, ``a`` on a grid from 1 down to ``lowest`` (the MSE observer of e.g. torchao / llm-compressor;
    the search is :func:`llmquant.schemes.primitives.search_range`).

    With a = 1 this is RTN; on the full signed grid RTN puts each group's largest-magnitude value exactly on
    a rounding boundary (``max|x| / s = (qmax - qmin) / 2``), so the slightest change of weight or step
    flips it: a knife edge for QAT. Shrinking moves it off the edge (and clips outliers when that pays)."""
    return range_qparams(x, scheme, "mse", steps=shrinks, lowest=lowest)


class _FakeQuant(torch.autograd.Function):
    """The STE/LSQ fake quantizer as one autograd node: it saves only its inputs (the float values are
    usually a weight parameter, so nothing new) instead of the several weight-sized intermediates that
    autograd would keep for the same expression, and recomputes the masks in backward."""

    @staticmethod
    def forward(ctx, rows, scale, zero, scheme):
        k = rows.shape[-1]
        s = expand_groups(scale, k, scheme)
        v = rows / s
        if zero is not None:
            z = expand_groups(zero, k, scheme)
            v = v + z
        q = torch.round(torch.clamp(v, scheme.qmin, scheme.qmax))
        if zero is not None:
            q = q - z
        ctx.scheme = scheme
        ctx.save_for_backward(rows, scale, zero)
        return q * s

    @staticmethod
    def backward(ctx, grad):
        rows, scale, zero = ctx.saved_tensors
        sch = ctx.scheme
        k = rows.shape[-1]
        s = expand_groups(scale, k, sch)
        v = rows / s
        z = None
        if zero is not None:
            z = expand_groups(zero, k, sch)
            v = v + z
        lo, hi = v < sch.qmin, v > sch.qmax
        inside = ~(lo | hi)
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:
            # d/ds: round(v) - v inside, (bound - z) outside (LSQ, eq. 3, with the zero point)
            ds = torch.where(inside, torch.round(v) - v, torch.where(lo, float(sch.qmin), float(sch.qmax)) - (0 if z is None else z))
            gs = _reduce_groups(grad * ds, scale.shape, sch)
        if zero is not None and ctx.needs_input_grad[2]:
            gz = _reduce_groups(grad * (~inside) * (-s), zero.shape, sch)  # d/dz: 0 inside, -s where clipped
        return gx, gs, gz, None


def fake_quant_ste(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` over rows of ``x`` (..., K) with STE rounding.

    ``scale`` / ``zero`` are (rows, groups) or (1, 1) as :func:`llmquant.schemes.compute_qparams` returns,
    already in their effective (rounded) values; gradients flow to ``x``, ``scale`` and ``zero``. The
    values are bit-identical to RTN's ``dequantize(quantize_to_int(...))`` (same operations, same order;
    clipping before rounding gives the same codes, the bounds being integers).
    """
    shape = x.shape
    k = shape[-1]
    rows = x.reshape(-1, k).float() if scheme.granularity != "tensor" else x.reshape(1, -1).float()
    return _FakeQuant.apply(rows, scale.float(), None if zero is None else zero.float(), scheme).reshape(shape)


class FakeQuantizer(nn.Module):
    """Holds one tensor's qparams: ``learn=True`` makes them LSQ parameters, else frozen buffers.

    ``shape`` is the (rows, groups) of the scheme; qparams stay unset (``initialized`` False) until
    :meth:`init_from` fills them from an observer's ranges (min-max of the tensor, or any given qparams).
    """

    def __init__(self, scheme: QuantScheme, shape: tuple[int, int], n_per_scale: int, learn: bool = True) -> None:
        super().__init__()
        self.scheme = scheme
        self.learn = learn
        self.observer = "minmax"  # what init_from uses when given a tensor (from_linear records its choice)
        self.g = 1.0 / math.sqrt(max(n_per_scale, 1) * max(scheme.qmax, 1))
        scale = torch.ones(shape)
        zero = None if scheme.symmetric else torch.zeros(shape)
        if learn:
            self.scale = nn.Parameter(scale)
            self.zero = None if zero is None else nn.Parameter(zero)
        else:
            self.register_buffer("scale", scale)
            if zero is None:
                self.zero = None
            else:
                self.register_buffer("zero", zero)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None, observer: str = "minmax") -> None:
        """Set the qparams from ``x`` by an observer (``minmax``: RTN's; ``mse``: :func:`mse_qparams`) or
        from given ``scale`` / ``zero`` (e.g. GPTQ's)."""
        if scale is None:
            self.observer = observer
            scale, zero = self.qparams_of(x, observer)
        self.scale.copy_(scale.float().reshape(self.scale.shape))
        if self.zero is not None:
            self.zero.copy_(zero.float().reshape(self.zero.shape))
        self.initialized.fill_(True)

    @torch.no_grad()
    def qparams_of(self, x: torch.Tensor, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (scale, zero) the ``observer`` gives for ``x`` (``minmax``: RTN's; ``mse``: :func:`mse_qparams`);
        per row or group, a block of ``x``'s rows gets those rows' qparams."""
        if observer == "mse":
            return mse_qparams(x, self.scheme)
        return compute_qparams(x.detach(), self.scheme)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The qparams as the forward uses (and the packed module will store) them: the step kept positive
        and cast to the scale dtype, the zero point rounded and clamped to the grid for integer zero points."""
        sch = self.scheme
        s = self.scale.clamp(min=EPS)
        if self.learn:
            s = grad_scale(s, self.g)
        s = ste_cast(s, scale_torch_dtype(sch))
        z = self.zero
        if z is not None:
            if self.learn:
                z = grad_scale(z, self.g)
            if sch.zero_point == "int":
                z = torch.clamp(ste_round(z), sch.qmin, sch.qmax)
            else:
                z = ste_cast(z, scale_torch_dtype(sch))
        return s, z

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Detached effective qparams for :meth:`QuantLinear.from_quantized`."""
        s, z = self.effective()
        return s.detach().clone(), None if z is None else z.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.effective()
        return fake_quant_ste(x, s, z, self.scheme)

    def extra_repr(self) -> str:
        return f"{self.scheme.name}, learn={self.learn}"


class ActivationFakeQuantizer(nn.Module):
    """Inputs of a linear: dynamic schemes compute qparams from each input (no gradient to them, as the
    run-time kernel does); static (per-tensor) ones hold an LSQ-learned (or frozen) step that an observer
    (min-max of the first batch seen) initialises."""

    def __init__(self, scheme: QuantScheme, in_features: int, learn: bool = True) -> None:
        super().__init__()
        self.scheme = scheme
        self.static = None if scheme.dynamic else FakeQuantizer(scheme, (1, 1), in_features, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.scheme
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.static is None:
            scale, zero = compute_qparams(x2.detach(), a)
            zero = None if zero is None else zero.float()
            return fake_quant_ste(x2, scale.float(), zero, a).reshape(shape).to(x.dtype)
        if not bool(self.static.initialized):
            self.static.init_from(x2)
        return self.static(x2).reshape(shape).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """``y = A(x) @ Q(W + (alpha / r) * B @ A_lora)^T + b``: a linear trained under quantization noise.

    ``weight`` is the float master copy (trainable unless ``lora_rank`` > 0, then frozen with trainable
    low-rank adapters ``lora_a`` (r x in) and ``lora_b`` (out x r, zero at start)); ``weight_quantizer``
    rounds it to ``scheme``; ``input_quantizer`` (when ``activation_scheme`` is given) rounds the input.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 activation_scheme: QuantScheme | None = None, learn_scales: bool = True,
                 lora_rank: int = 0, lora_alpha: float | None = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.activation_scheme = scheme, activation_scheme
        # device: where the float weight and bias are made ("meta": filled later, e.g. each rank's shard)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        rows = 1 if scheme.granularity == "tensor" else out_features
        per = {"tensor": out_features * in_features, "group": min(scheme.group_size or in_features, in_features)}.get(
            scheme.granularity, in_features)
        self.weight_quantizer = FakeQuantizer(scheme, (rows, scheme.num_groups(in_features)), per, learn_scales)
        self.input_quantizer = (
            None if activation_scheme is None else ActivationFakeQuantizer(activation_scheme, in_features, learn_scales)
        )
        self.lora_rank = int(lora_rank)
        if self.lora_rank > 0:
            self.lora_scaling = (lora_alpha if lora_alpha is not None else self.lora_rank) / self.lora_rank
            self.lora_a = nn.Parameter(torch.empty(self.lora_rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, self.lora_rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.weight.requires_grad_(False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: QuantScheme, activation_scheme: QuantScheme | None = None,
                    *, learn_scales: bool = True, lora_rank: int = 0, lora_alpha: float | None = None,
                    init_qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    observer: str = "minmax") -> "FakeQuantLinear":
        """Wrap ``lin``'s weight; qparams from the ``observer`` (``minmax``: RTN's, or ``mse``) on it, or
        ``init_qparams`` = (scale, zero). A weight on the meta device stays there, the qparams unset
        (``weight_quantizer.initialized`` False) until the weight is filled and they are set from it."""
        meta = lin.weight.is_meta
        m = cls(lin.in_features, lin.out_features, scheme, bias=lin.bias is not None,
                activation_scheme=activation_scheme, learn_scales=learn_scales, lora_rank=lora_rank,
                lora_alpha=lora_alpha, device="meta" if meta else None)
        if meta:
            m.weight_quantizer.observer = observer
            return m
        m.to(lin.weight.device)
        with torch.no_grad():
            m.weight.copy_(lin.weight.float())
            if lin.bias is not None:
                m.bias.copy_(lin.bias.float())
        if init_qparams is None:
            m.weight_quantizer.init_from(m.weight, observer=observer)
        else:
            m.weight_quantizer.init_from(scale=init_qparams[0], zero=init_qparams[1])
        return m

    def merged_weight(self) -> torch.Tensor:
        """The float weight the quantizer sees (adapters merged in)."""
        if self.lora_rank > 0:
            return self.weight + (self.lora_b @ self.lora_a) * self.lora_scaling
        return self.weight

    def _merged_quantized(self) -> torch.Tensor:
        return self.weight_quantizer(self.merged_weight())

    def quantized_weight(self) -> torch.Tensor:
        if self.lora_rank > 0 and torch.is_grad_enabled():
            # recompute the merged weight in backward rather than keep a weight-sized copy per layer:
            # the frozen base + adapters then hold less than full training (no weight grads or Adam moments)
            return torch.utils.checkpoint.checkpoint(self._merged_quantized, use_reentrant=False)
        return self._merged_quantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.quantized_weight()
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)

    def extra_repr(self) -> str:
        a = "" if self.activation_scheme is None else f", act={self.activation_scheme.name}"
        r = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}{a}{r}"
