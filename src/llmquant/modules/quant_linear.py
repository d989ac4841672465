"""QuantLinear: a linear layer holding packed integer weights, scales and zero points.

Stored state (what ``state_dict`` and the saved file hold):
``qweight``  uint8, the unsigned codes ``q - qmin`` packed densely (see :mod:`llmquant.packing`);
``scale``    (out_features, groups) in the scheme's scale dtype;
``zero``     (out_features, groups), asymmetric schemes only: uint8 for integer zero points (stored as
             ``z - qmin``), the scale dtype for float ones and for float minima (``zero_point="min"``:
             the offset ``m`` of ``x = q * s + m``);
``bias``     float, when the original had one.
The forward runs through the kernel :mod:`llmquant.kernels` selects for the device and format.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .. import kernels
from ..kernels import Kernel
from ..packing import pack, packed_numel, unpack
from ..schemes import QuantScheme, dequantize
from ..schemes.primitives import hadamard, rotate_blocks
from ..schemes.formats import format_bytes
from ..schemes.primitives import scale_torch_dtype
from .storage import tensor_bytes


class _InputGrad(torch.autograd.Function):
    """A frozen QuantLinear in a graph: its kernel's output, and the input's gradient through the weight as
    the module computes it (``dL/dx = dL/dy W``; straight through an activation rounding). The weight is
    dequantized for each backward, a block of rows at a time, and not kept."""

    @staticmethod
    def forward(ctx, x, mod, kernel, state):
        ctx.mod = mod
        return kernel.run(mod, state, x)

    @staticmethod
    def backward(ctx, g):
        mod = ctx.mod
        gx = None
        for r0, r1 in mod.row_blocks():
            part = g[..., r0:r1] @ mod.dequantize_weight(g.dtype, g.device, rows=(r0, r1))
            gx = part if gx is None else gx + part
        return gx, None, None, None


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        activation_scheme: QuantScheme | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.activation_scheme = activation_scheme
        rows = 1 if scheme.granularity == "tensor" else out_features
        groups = scheme.num_groups(in_features)
        sdt = scale_torch_dtype(scheme)
        self.register_buffer("qweight", torch.zeros(packed_numel(in_features * out_features, scheme.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=sdt))
        if scheme.symmetric:
            self.zero = None
        else:
            zdt = torch.uint8 if scheme.zero_point == "int" else sdt
            self.register_buffer("zero", torch.zeros(rows, groups, dtype=zdt))
        if activation_scheme is not None and not activation_scheme.dynamic:
            if activation_scheme.granularity != "tensor":
                from ..errors import SchemeError

                raise SchemeError("static (calibrated) activation scales are per tensor; use dynamic for per token")
            # calibrated per-tensor input qparams (static activation quantization)
            self.register_buffer("input_scale", torch.ones(1, 1, dtype=torch.float32))
            if not activation_scheme.symmetric:
                self.register_buffer("input_zero", torch.zeros(1, 1, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self.kernel_override: str | None = None
        self._kernel = None
        self._kernel_state = None
        self._kernel_key = None
        self._rotation = None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        scheme: QuantScheme,
        bias: torch.Tensor | None = None,
        activation_scheme: QuantScheme | None = None,
        input_scale: torch.Tensor | None = None,
        input_zero: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Build from integer codes ``q`` (out, in) in [qmin, qmax] and their qparams; ``input_scale`` /
        ``input_zero`` are the calibrated per-tensor activation qparams of a static activation scheme."""
        out_features, in_features = q.shape
        m = cls(in_features, out_features, scheme, bias=bias is not None, activation_scheme=activation_scheme,
                bias_dtype=bias.dtype if bias is not None else torch.float32)
        m.qweight = pack((q.to(torch.int16) - scheme.qmin).to(torch.uint8).cpu(), scheme.bits)
        m.scale = scale.detach().to(scale_torch_dtype(scheme)).reshape(m.scale.shape).cpu().clone()
        if zero is not None:
            if scheme.zero_point == "int":
                m.zero = (zero.to(torch.int16) - scheme.qmin).to(torch.uint8).reshape(m.zero.shape).cpu().clone()
            else:
                m.zero = zero.detach().to(scale_torch_dtype(scheme)).reshape(m.zero.shape).cpu().clone()
        if bias is not None:
            m.bias = bias.detach().cpu().clone()
        if input_scale is not None:
            m.input_scale = input_scale.detach().float().reshape(1, 1).cpu().clone()
        if input_zero is not None:
            m.input_zero = input_zero.detach().float().reshape(1, 1).cpu().clone()
        return m

    # ---- views of the stored weights -----------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Signed integer codes q (int16, out x in)."""
        u = unpack(self.qweight, self.scheme.bits, self.in_features * self.out_features)
        return (u.to(torch.int16) + self.scheme.qmin).reshape(self.out_features, self.in_features)

    def zero_point(self) -> torch.Tensor | None:
        """Zero points in the integer domain (float tensor), the float offsets ``m`` for ``zero_point="min"``,
        or None for symmetric schemes."""
        if self.zero is None:
            return None
        if self.scheme.zero_point == "int":
            return self.zero.to(torch.int16) + self.scheme.qmin
        return self.zero

    def dequantize_weight(self, dtype: torch.dtype = torch.float32, device=None,
                          rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The weight as the module computes it; ``rows=(r0, r1)``: only those output rows (unpacking only
        their bytes when the rows start on a whole byte, which they do for widths that are multiples of 8)."""
        if rows is not None and not self._rows_packable(*rows):
            return self.dequantize_weight(dtype, device)[rows[0]:rows[1]]
        if rows is None:
            q = self.codes()
            scale, z = self.scale, self.zero_point()
        else:
            r0, r1 = rows
            n, bits = self.in_features, self.scheme.bits
            b0 = r0 * n * bits // 8
            b1 = packed_numel(r1 * n, bits)
            u = unpack(self.qweight[b0:b1], bits, (r1 - r0) * n)
            q = (u.to(torch.int16) + self.scheme.qmin).reshape(r1 - r0, n)
            z = self.zero_point()
            scale, z = self.scale[r0:r1], None if z is None else z[r0:r1]
        if device is not None:
            q = q.to(device)
        return dequantize(q, scale.to(q.device), None if z is None else z.to(q.device), self.scheme, dtype=dtype)

    def _rows_packable(self, r0: int, r1: int) -> bool:
        return (self.scheme.granularity != "tensor" and (r0 * self.in_features) % 8 == 0
                and ((r1 * self.in_features) % 8 == 0 or r1 == self.out_features))

    def row_blocks(self, block: int = 1 << 22):
        """``(r0, r1)`` ranges of output rows of about ``block`` weights each, starting on whole bytes of the
        packed codes (so that :meth:`dequantize_weight` unpacks only their bytes)."""
        step = max(1, block // max(self.in_features, 1))
        while step < self.out_features and (step * self.in_features) % 8:
            step += 1
        for r0 in range(0, self.out_features, step):
            yield r0, min(r0 + step, self.out_features)

    def weight_sqnr_db(self, ref: torch.Tensor, block: int = 1 << 22, codes: torch.Tensor | None = None) -> float:
        """SQNR (dB) of this module's weight against the float weight ``ref`` (out, in), a block of rows at a
        time: the temporaries are those of ``block`` weights, not of the whole matrix. ``codes``: the signed
        codes this module was built from (:meth:`from_quantized`'s ``q``), read instead of unpacking its own."""
        signal = noise = 0.0
        z_all = self.zero_point()
        for r0, r1 in self.row_blocks(block):
            a = ref[r0:r1].detach().double()
            if codes is None or self.scheme.granularity == "tensor":
                d = self.dequantize_weight(torch.float32, ref.device, rows=(r0, r1))
            else:  # what dequantize_weight computes, from the codes at hand
                z = None if z_all is None else z_all[r0:r1].to(ref.device)
                d = dequantize(codes[r0:r1].to(ref.device), self.scale[r0:r1].to(ref.device), z, self.scheme)
            d = d.double()
            noise += float((a - d).pow(2).sum())
            signal += float(a.pow(2).sum())
            del a, d
        return float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")

    @property
    def weight_bits(self) -> float:
        """Stored bits per weight, scales and zero points included."""
        return 8 * format_bytes(self.scheme, self.out_features, self.in_features) / (self.in_features * self.out_features)

    def stored_tensors(self) -> list[torch.Tensor]:
        """What the module stores (see :mod:`llmquant.modules.storage`): codes, scales, zero points, bias."""
        return [t for t in (self.qweight, self.scale, self.zero, getattr(self, "bias", None)) if t is not None]

    def packed_bytes(self) -> int:
        return tensor_bytes(self.stored_tensors())

    # ---- compute -----------------------------------------------------------------------------
    @property
    def kernel(self) -> Kernel:
        """The kernel this module runs with where its weights are (what the next forward there selects)."""
        return kernels.select(self, self.qweight.device)

    @property
    def prepared_kernel(self) -> Kernel | None:
        """The kernel the last forward (or :meth:`prepare_kernel`) prepared; None before the first call and
        after :meth:`reset_kernel`."""
        return self._kernel

    @property
    def kernel_state(self) -> Any:
        """That kernel's run-time state, None when none is prepared. Its type is the kernel's own: only the
        kernel reads its fields (what others need of it goes through :class:`~llmquant.kernels.Kernel`)."""
        return self._kernel_state

    def reset_kernel(self) -> None:
        self._kernel = self._kernel_state = self._kernel_key = None

    def prepare_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[Kernel, Any]:
        """``(kernel, state)`` for inputs of ``dtype`` on ``device``: selected and prepared on the first call
        for that device, dtype and ``kernel_override``, then kept."""
        key = (device, dtype, self.kernel_override)
        if self._kernel_key != key:
            self._kernel = kernels.select(self, device)
            self._kernel_state = self._kernel.prepare(self, device, dtype)
            self._kernel_key = key
            a = self.activation_scheme
            self._rotation = None if a is None or a.rotation is None else hadamard(a.rotation, torch.float32, device)
        return self._kernel, self._kernel_state

    def runner(self, device: torch.device, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> y`` as :meth:`forward`, with the kernel selected and prepared now rather than checked per
        call (for runtimes that call the module once per token)."""
        kernel, state = self.prepare_kernel(device, dtype)
        rot = self._rotation
        if rot is None:
            return lambda x: kernel.run(self, state, x)
        return lambda x: kernel.run(self, state, rotate_blocks(x, rot.shape[0], rot))

    @staticmethod
    def fused_runner(modules: Sequence["QuantLinear"], device: torch.device, dtype: torch.dtype):
        """``x -> (y_1, ..., y_n)`` in one kernel call for modules that share their input (q/k/v, gate/up),
        when one kernel prepared them all and can fuse them (:meth:`Kernel.fuse`); None otherwise."""
        shared = QuantLinear._one_kernel(modules, device, dtype)
        fused = None if shared is None else shared[0].fuse(modules, shared[1])
        if fused is None:
            return None
        sizes = [m.out_features for m in modules]
        return lambda x: fused(x).split(sizes, -1)

    @staticmethod
    def native_spec(modules: Sequence["QuantLinear"], device: torch.device, dtype: torch.dtype):
        """The compiled decode step's description of these modules' one-row product, outputs side by side, when
        one kernel prepared them all and has one (:meth:`Kernel.native_spec`); None otherwise."""
        shared = QuantLinear._one_kernel(modules, device, dtype)
        return None if shared is None else shared[0].native_spec(modules, shared[1])

    @staticmethod
    def _one_kernel(modules: Sequence["QuantLinear"], device: torch.device, dtype: torch.dtype):
        """``(kernel, states)`` when one kernel prepared every module and none rotates its input; else None."""
        prepared = [m.prepare_kernel(device, dtype) for m in modules]
        kernel = prepared[0][0]
        if any(k is not kernel for k, _ in prepared) or any(m._rotation is not None for m in modules):
            return None
        return kernel, [st for _, st in prepared]

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half() ... invalidate prepared state
        self.reset_kernel()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_kernel()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, state = self.prepare_kernel(x.device, x.dtype)
        if self._rotation is not None:  # the stored weights are rotated alike (see QuantScheme.rotation)
            x = rotate_blocks(x, self._rotation.shape[0], self._rotation)
        if x.requires_grad and torch.is_grad_enabled():  # inside a graph (QAT, a sensitivity scan): the
            return _InputGrad.apply(x, self, kernel, state)  # kernels have no backward of their own
        return kernel.run(self, state, x)

    def __getstate__(self):  # deepcopy / pickle: drop opaque kernel state, it is rebuilt on use
        state = self.__dict__.copy()
        state["_kernel"] = state["_kernel_state"] = state["_kernel_key"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"bias={self.bias is not None}"
        )
