"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), arXiv:2210.17323.

Minimizes the layer output error ``||W X - Q X||^2`` one column (input channel) at a time, with the
Hessian ``H = 2 X X^T`` of that objective. Quantizing column ``j`` to ``q_j`` moves the still-unquantized
columns by the optimal-brain-surgeon update

    delta W[:, j:] = -(w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j:}

using rows of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), so the inverse is never
updated. Columns are processed in blocks: updates inside a block are applied at once, the rest of the
matrix gets the block's accumulated error in one matrix product ("lazy batch updates"). ``H`` is dampened
by ``damp * mean(diag H)`` before the inverse. With ``act_order="full"`` columns go by decreasing
``diag H``; with ``"group"`` whole groups go by decreasing summed ``diag H`` and the columns inside each by
decreasing ``diag H``. The permutation is undone at the end, and groups stay contiguous in the original
column order, so the output (codes, scale, zero) has exactly the format of
:func:`llmquant.algorithms.rtn_quantize`. A group's qparams are computed when the loop reaches the first
of its columns, from the group's weights as updated so far, or, with ``static_groups``, for every group up
front from the original weights; either way by one range search
(:func:`llmquant.schemes.primitives.range_qparams`: min-max as RTN, least squared error, or least
squared error weighted per column by ``diag H``, i.e. by the mean square of that input). The last group
may be ragged when the group size does not divide the width.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext

import torch

from ..errors import CalibrationError, SchemeError
from ..schemes import QuantScheme, check_finite
from ..schemes.methods import act_order_name
from ..schemes.primitives import from_grid, round_to_grid, scale_torch_dtype
from .search import range_qparams

log = logging.getLogger(__name__)


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``2 X X^T / n`` from inputs ``x`` (..., in_features); the flows accumulate it over batches instead."""
    x = x.reshape(-1, x.shape[-1]).double()
    return (2 * x.T @ x / x.shape[0]).float()


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H^-1``; more dampening is tried if H is too ill-conditioned."""
    mean_diag = float(h.diagonal().mean())
    for attempt in range(6):
        d = damp * (10**attempt) if damp > 0 else (0.0 if attempt == 0 else 1e-4 * 10**attempt)
        try:
            # H + d * mean * I (the damping on the diagonal only), then one factorization and one triangular
            # inverse: with J the order-reversing permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J),
            # and J L^-1 J is upper triangular, the factor wanted (2-3x faster than factorizing H, inverting it
            # and factorizing H^-1, and closer to a float64 reference); row-major, as the column loops read rows
            lower = h.flip(0, 1)
            lower.diagonal().add_(d * mean_diag)
            lower = torch.linalg.cholesky(lower)
            upper = _lower_inverse(lower).flip(0, 1).contiguous()
            del lower
            if attempt:
                log.warning("%s: Hessian needed dampening %.3g (asked %.3g) to be invertible", name, d, damp)
            return upper
        except torch.linalg.LinAlgError:
            continue
    raise CalibrationError(f"{name}: the calibration Hessian is not invertible even with heavy dampening; "
                           "give more (or more varied) calibration text")


def _lower_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L`` by halves, ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``:
    2/3 of a triangular solve's arithmetic against the identity, all of it in matrix products (about 3x faster
    at 1536 inputs); a triangular solve below ``leaf`` rows."""
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False)
    h = n // 2
    out = torch.zeros_like(lower)
    a_inv = out[:h, :h]
    a_inv.copy_(_lower_inverse(lower[:h, :h], leaf))
    d_inv = out[h:, h:]
    d_inv.copy_(_lower_inverse(lower[h:, h:], leaf))
    torch.mm(d_inv, lower[h:, :h] @ a_inv, out=out[h:, :h])
    out[h:, :h].neg_()
    return out


class _ColumnQparams:
    """(rows,) scale and zero (or None) of each column: the qparams' columns, as float32 rows of a transposed
    copy made once (a group's are read again only after the sweep set them: ``refresh``)."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> None:
        self.scale, self.zero, self.scheme = scale, zero, scheme
        self.st = scale.float().T.contiguous()
        self.zt = None if zero is None else zero.float().T.contiguous()

    def refresh(self, g: int) -> None:
        self.st[g] = self.scale[:, g].float()
        if self.zt is not None:
            self.zt[g] = self.zero[:, g].float()

    def __call__(self, col: int):
        g = col // self.scheme.group_size if self.scheme.granularity == "group" else 0
        return self.st[g], None if self.zt is None else self.zt[g]


def column_order(diag: torch.Tensor, act_order: bool | str, group_size: int | None) -> torch.Tensor | None:
    """The processing order of the columns (None: as stored) from the Hessian's diagonal."""
    mode = act_order_name(act_order)
    if mode == "off":
        return None
    if mode == "full" or group_size is None:
        return torch.argsort(diag, descending=True, stable=True)
    k = diag.numel()
    starts = list(range(0, k, group_size))
    weight = torch.stack([diag[a : a + group_size].sum() for a in starts])
    parts = [a + torch.argsort(diag[a : a + group_size], descending=True, stable=True)
             for a in (starts[i] for i in torch.argsort(weight, descending=True, stable=True).tolist())]
    return torch.cat(parts)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool | str = False,
    static_groups: bool = False,
    observer: str = "minmax",
    name: str = "weight",
    consume_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (int16, shaped like ``weight``), scale and zero point (None if symmetric), as RTN.

    ``hessian``: (in, in), ``2 X X^T / n`` of the layer's calibration inputs. ``act_order``: the column
    order (:data:`llmquant.schemes.methods.ACT_ORDERS`; True / False mean "full" / "off"). ``static_groups``: every group's qparams
    from the original weights before the sweep (else from the updated weights when the sweep reaches the
    group). ``observer``: the range search for those qparams
    (:func:`llmquant.schemes.primitives.range_qparams`; "imse" weights each column by ``diag H``; on k-quant
    grids llama.cpp's own group search, weighted by ``diag H`` for "imse", unweighted otherwise). The defaults are the paper's algorithm;
    :class:`llmquant.schemes.GPTQParams` holds the measured best.
    ``consume_hessian``: the caller gives it up (an fp32 tensor made for this call), so it is worked on in
    place instead of copied (at 8192 inputs each copy is 268 MB).
    """
    return _gptq(weight, hessian, scheme, damp, block_size, act_order, name, consume_hessian, static_groups, observer)


def _gptq(weight, hessian, scheme, damp, block_size, act_order, name, consume_hessian=False, static_groups=False,
          observer="minmax"):
    w = weight.detach().float()  # only read: the column loop works on its own (transposed) copy
    check_finite(w, name)
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise SchemeError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input features")
    if not torch.isfinite(hessian).all():
        raise CalibrationError(f"{name}: the calibration statistics hold NaN/Inf; check the calibration inputs")
    if scheme.granularity == "tensor":
        raise SchemeError("GPTQ needs per-channel or grouped weight scales, not per-tensor")
    own = consume_hessian and hessian.dtype == torch.float32 and hessian.device == w.device
    h = hessian.detach() if own else hessian.detach().float().clone().to(w.device)
    del hessian
    imp = h.diagonal().clone()  # each column's importance for the "imse" range search (original order)
    dead = imp == 0  # inputs that were always zero: their columns do not affect the output
    h[dead, dead] = 1.0

    grouped = scheme.granularity == "group"
    perm = column_order(imp, act_order, scheme.group_size if grouped else None)
    if perm is not None:
        h = h[perm[:, None], perm]  # one gather, one copy
    # small factorizations on one thread: at this size a thread hand-off costs more than it saves (a 576-wide
    # cholesky_inverse took 0.94 s on 2 threads of a busy 2-core machine, 3 ms on one)
    with _few_threads(w.device) if cols <= _SMALL_FACTOR else nullcontext():
        u = _inverse_cholesky(h, damp, name)
    del h

    # k-quant grids: llama.cpp's own group search ("minmax"), weighted by diag H for "imse" (as llama.cpp
    # weights it by an importance matrix); "mse" has no k-quant form and takes the unweighted search
    search = observer if scheme.super_group is None or observer == "imse" else "minmax"

    def qparams(x, cols_imp):
        return range_qparams(x, scheme, search, cols_imp)

    ngroups = scheme.num_groups(cols)
    sdt = scale_torch_dtype(scheme)
    done = orig_list = pos_of = None
    if grouped:
        scale = torch.zeros(rows, ngroups, dtype=sdt, device=w.device)
        zero = None if scheme.symmetric else torch.zeros(rows, ngroups, dtype=torch.int16 if scheme.zero_point == "int" else sdt, device=w.device)
        done = [False] * ngroups
        # original column index at each processing position, and each group's processing positions
        orig = perm if perm is not None else torch.arange(cols, device=w.device)
        pos_of = torch.empty(cols, dtype=torch.long, device=w.device)
        pos_of[orig] = torch.arange(cols, device=w.device)
        orig_list = orig.tolist()
        if static_groups or scheme.super_group is not None:
            # every group's qparams up front from the original weights (two-level k-quant scales tie a
            # super-block's groups together, so they are always fixed so); GPTQ then chooses the codes on them
            scale, zero = qparams(w, imp)
            done = [True] * ngroups
    else:  # per channel: one scale per row, from the whole matrix
        scale, zero = qparams(w, imp)
    # work on W^T (columns in processing order) so that a column is a contiguous row of memory: one copy
    wt = (w.T[perm] if perm is not None else w.T).contiguous()
    del w
    # the Python loop on one thread (the range search and the factorizations are large ops and keep them all);
    # the compiled loop splits the rows over every thread itself
    mod = _native_loop(wt)
    with nullcontext() if mod is not None else _few_threads(wt.device):
        qcodes = _column_loop(wt, u, scale, zero, scheme, block_size, grouped, orig_list, pos_of, done,
                              lambda cur, g: qparams(cur, imp[g * scheme.group_size : (g + 1) * scheme.group_size]),
                              mod)
    qcodes = qcodes.T
    if perm is not None:
        qcodes = qcodes[:, torch.argsort(perm)]
    return qcodes.contiguous(), scale, zero


#: Widths whose Hessian factorizations run on one thread.
_SMALL_FACTOR = 2048


@contextmanager
def _few_threads(device):
    """GPTQ's loop is thousands of small ops: on CPU, thread hand-offs cost more than they save (5-20x
    slower on a loaded 2-core machine), so it runs on one thread."""
    n = torch.get_num_threads()
    if device.type == "cpu" and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _native_loop(wt):
    """The compiled column loop (``kernels/csrc/gptq_loop.cpp``) when it applies: fp32 on the CPU with the
    extension built; None otherwise (the Python loop below computes the same)."""
    if wt.device.type != "cpu" or wt.dtype != torch.float32 or os.environ.get("LLMQUANT_GPTQ_LOOP") == "python":
        return None
    from ..kernels import native

    return native.load()


def _grid_mode(scheme) -> int:
    """gptq_columns' rounding rule: 0 symmetric, 1 zero point added, 2 float minimum (round_to_grid's cases)."""
    if scheme.symmetric:
        return 0
    return 2 if scheme.zero_point == "min" else 1


def _column_loop(wt, u, scale, zero, scheme, block_size, grouped, orig_list, pos_of, done, group_qparams, mod=None):
    """GPTQ's loop over columns (rows of ``wt``), in blocks with lazy batch updates; returns codes (cols, rows).
    A block's columns go in runs that end where a group's qparams are still to be computed from the current
    weights (dynamic groups); ``mod``: the compiled loop (:func:`_native_loop`), one call per run with the rows
    over the threads, else the columns one at a time in PyTorch."""
    cols, rows = wt.shape
    qcodes = torch.zeros(cols, rows, dtype=torch.int16, device=wt.device)
    column_qparams = _ColumnQparams(scale, zero, scheme)
    group_of = [c // scheme.group_size for c in orig_list] if grouped else [0] * cols  # by processing position
    if mod is not None:
        gidx_all = torch.tensor(group_of, dtype=torch.int64)
        zt = column_qparams.zt if column_qparams.zt is not None else torch.empty(0)
        mode, qmin, qmax = _grid_mode(scheme), float(scheme.qmin), float(scheme.qmax)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        n = i2 - i1
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        a = 0
        while a < n:
            g = group_of[i1 + a]
            if grouped and not done[g]:  # first column of this group reached: its qparams from current weights
                members = pos_of[g * scheme.group_size : min((g + 1) * scheme.group_size, cols)]
                s_g, z_g = group_qparams(_current_columns(wt, w1, err1, u, members, i1, i2, a), g)
                scale[:, g] = s_g[:, 0]
                if zero is not None:
                    zero[:, g] = z_g[:, 0]
                column_qparams.refresh(g)
                done[g] = True
            b = a + 1
            while b < n and (not grouped or done[group_of[i1 + b]]):
                b += 1
            if mod is not None:
                mod.gptq_columns(w1, u1, column_qparams.st, zt, gidx_all[i1:i2], a, b, mode, qmin, qmax,
                                 qcodes[i1:i2], err1)
            else:
                for i in range(a, b):
                    s, z = column_qparams(orig_list[i1 + i] if grouped else i1 + i)
                    wc = w1[i]
                    q = round_to_grid(wc, s, z, scheme)  # the primitives' rounding on one column
                    deq = from_grid(q, s, z, scheme)
                    qcodes[i1 + i] = q.to(torch.int16)
                    e = (wc - deq).div_(u1[i, i])
                    if i + 1 < n:
                        w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1.0)
                    err1[i] = e
            a = b
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
    return qcodes


def _current_columns(wt, w1, err1, u, members, i1, i2, i):
    """Current (updated) values, as (rows, len(members)), of the columns at processing positions ``members``
    while column ``i1 + i`` of the block ``[i1, i2)`` is next (all layouts transposed: a row per column).
    Block columns live in ``w1``; later ones still owe the updates of the block's first ``i`` columns."""
    out = torch.empty(members.numel(), wt.shape[1], dtype=wt.dtype, device=wt.device)
    inside = (members >= i1) & (members < i2)
    if inside.any():
        out[inside] = w1[members[inside] - i1]
    later = members >= i2
    if later.any():
        m = members[later]
        out[later] = wt[m] - u[i1 : i1 + i, m].T @ err1[:i] if i else wt[m]
    return out.T
