"""Per-linear input statistics gathered with forward pre-hooks: ``X^T X``, ``sum |X|`` and a token count.

Linears fed by the very same tensor (q/k/v after a norm, gate/up) share one accumulator, so each distinct
input's Gram matrix is computed once. NaN/Inf in an input raises :class:`CalibrationError`.

The sums are kept in float64 while they accumulate, each batch's float32 product added once: a float64 sum
of float32 terms rounds back to the same float32 whatever order the batches come in, so the statistics
(and GPTQ's / AWQ's codes) are the same when the batches are split over several processes
(:mod:`llmquant.flows.distributed`). :meth:`InputStats.finish` turns them into float32 once the pass is
over (the sums of one (K, K) Gram matrix take twice the memory only while the pass runs).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..errors import CalibrationError


#: rows of ``X^T X`` made per product: bounds the float32 temporary of a wide input (235 MB at K = 14336)
_ROWS = 4096
#: from this many input features on, ``X^T X`` is accumulated as its upper block staircase (row blocks from
#: the diagonal on: at most three quarters of the products; 20-35% less time at 576-1536 inputs) and mirrored
#: once when read
SYMMETRIC_FROM = 512


class InputStats:
    """``bf16``: the products of the inputs rounded to bfloat16 (bfloat16 matrix products, twice float32's speed
    where the CPU has bfloat16 dot products; each batch's product rounded to bfloat16 before the float64 sum);
    for a calibration pass that computes in bfloat16 anyway (``CalibSpec(compute="bfloat16")``)."""

    def __init__(self, k: int, device, bf16: bool = False) -> None:
        self.bf16 = bf16
        self._xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        # rows per block of the staircase: four blocks (62% of the full product's arithmetic) measured 2-7% faster
        # than two at 576-1536 inputs and 2048 tokens; more gave nothing
        self._rows = min(_ROWS, max(128, -(-k // 4))) if k >= SYMMETRIC_FROM else k
        self._mirrored = True
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def xtx(self) -> torch.Tensor:
        """The accumulated ``X^T X`` (k, k)."""
        if not self._mirrored:
            k, r = self._xtx.shape[0], self._rows
            for i in range(0, k, r):
                j = min(i + r, k)
                self._xtx[j:, i:j] = self._xtx[i:j, j:].T
            self._mirrored = True
        return self._xtx

    def add(self, x: torch.Tensor, name: str) -> None:
        with torch.autocast(x.device.type, enabled=False):  # float32 sums, also inside a bfloat16 pass
            self._add(x, name)

    def _add(self, x: torch.Tensor, name: str) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        a = x2.abs().sum(0)
        if not torch.isfinite(a).all():  # any NaN/Inf input makes its column's sum NaN/Inf
            raise CalibrationError(f"NaN/Inf in the calibration inputs of {name}: the model overflows on the "
                                   "calibration text (try float32, or other calibration text)")
        if self._xtx.dtype != torch.float64:
            raise CalibrationError(f"the statistics of {name} were finished; a new pass needs new statistics")
        k, r = x2.shape[1], self._rows
        if self.bf16:
            x2 = x2.to(torch.bfloat16)
        for i in range(0, k, r):  # float32 products, float64 sums (see the module docstring)
            self._xtx[i : i + r, i:] += x2[:, i : i + r].T @ x2[:, i:]
        self._mirrored = r >= k
        self.abs_sum += a
        self.n += x2.shape[0]

    def finish(self) -> None:
        """The pass is over: keep the sums in float32 (half the memory; what the quantizers read)."""
        if self._xtx.dtype == torch.float64:
            self._xtx = self.xtx.float()
            self.abs_sum = self.abs_sum.float()

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 X X^T / n``."""
        return (self.xtx * (2.0 / max(self.n, 1))).float()

    @property
    def gram(self) -> torch.Tensor:
        """``X^T X / n``: the mean squared output error of a weight error D is ``sum((D G) * D)``."""
        return (self.xtx / max(self.n, 1)).float()

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


class PreHooks:
    """A context manager attaching ``self._hook(name)`` as a forward pre-hook to each of ``self.linears``."""

    linears: dict[str, nn.Module]
    _handles: list

    def _hook(self, name: str):
        raise NotImplementedError

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StatsCollector(PreHooks):
    """Context manager: hooks on ``linears`` (name -> module) accumulate their inputs' statistics.

    ``owner[name]`` is the linear whose accumulator ``name`` shares; ``stats[owner]`` holds it.
    """

    def __init__(self, linears: dict[str, nn.Module], bf16: bool = False, accumulate: bool = True) -> None:
        self.linears, self.bf16, self.accumulate = linears, bf16, accumulate  # False: find the owners only
        self.owner: dict[str, str] = {}
        self.stats: dict[str, InputStats] = {}
        self._recent: list[tuple[weakref.ref, str]] = []
        self._handles = []

    def _hook(self, name: str):
        def pre(mod, args):
            x = args[0]
            own = self.owner.get(name)
            if own is None:  # first call: is this the tensor another linear just saw?
                own = next((o for ref, o in self._recent if ref() is x), name)
                self.owner[name] = own
                if own == name:
                    if self.accumulate:
                        self.stats[name] = InputStats(x.shape[-1], x.device, self.bf16)
                    self._recent = [(r, o) for r, o in self._recent if r() is not None][-8:]
                    self._recent.append((weakref.ref(x), name))
            if own == name and self.accumulate:
                self.stats[name].add(x, name)

        return pre

    def of(self, name: str) -> InputStats:
        return self.stats[self.owner[name]]

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._recent = []

    def finish(self) -> None:
        for st in self.stats.values():
            st.finish()

    def groups(self) -> dict[str, list[str]]:
        """owner -> the linears sharing its input, in the order of ``linears``."""
        out: dict[str, list[str]] = {}
        for n in self.linears:
            if n in self.owner:
                out.setdefault(self.owner[n], []).append(n)
        return out


@torch.no_grad()
def input_square_sums(model: nn.Module, linears: dict[str, nn.Module], batches, *,
                      progress: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """Per linear: the sum over the calibration tokens of each input column's square (float64) and the token
    count, from one pass of ``model`` over ``batches`` (token ids): llama.cpp's importance matrix."""
    from tqdm.auto import tqdm

    sums: dict[str, list] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"NaN/Inf in the calibration inputs of {name}")
            s = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0])
            s[0] += x.pow(2).sum(0)
            s[1] += x.shape[0]

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for b in tqdm(batches, desc="imatrix", disable=not progress, leave=False):
            model(b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (s, c) for n, (s, c) in sums.items()}
