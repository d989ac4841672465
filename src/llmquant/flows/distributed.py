"""Data-parallel runs on PyTorch's own ``torch.distributed`` (launched by ``torchrun``, or by
``llmquant ... --workers N`` on one machine, which starts the same processes with the same environment).

What is split and what is shared, layer by layer (:mod:`llmquant.flows.pipeline`):

- the calibration batches: rank ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...`` of the one global
  list (the same batches one process would make), records its own layer inputs and runs them through each
  float and quantized layer;
- the statistics of each layer's float pass are summed over the ranks (``X^T X``, ``sum |X|``, token
  counts; :class:`~llmquant.flows.stats.InputStats` keeps its sums in float64, each batch's product added
  once, so the sum is the same whichever ranks hold which batches: the codes do not depend on the number of
  ranks); observers' extremes are reduced with min / max;
- the per-module work of the quantizer (GPTQ's solve of each group of linears sharing an input, AWQ's
  searches) is dealt out to the ranks, balanced by its cost, and each result broadcast from the rank that
  made it, so every rank installs the same quantized layer;
- the layer's output error is summed per batch in the global batch order (the one-process value).

Rank 0 alone writes the output and its per-layer checkpoints (the other ranks send it their next-layer
inputs, so a run can be resumed with any number of ranks). A rank that dies or hangs makes the others stop
within the timeout with one :class:`~llmquant.errors.DistributedError` naming the rank(s) and the layer;
nothing is written, and the run can be resumed from its last finished layer.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import DistributedError

log = logging.getLogger(__name__)

#: seconds a rank waits for the others before the run stops (``--timeout``, ``LLMQUANT_DIST_TIMEOUT``)
DEFAULT_TIMEOUT = 600.0

_ACTIVE: "Group | None" = None


class Group:
    """The ranks of a run as llmquant's flows see them (one process: no Group at all)."""

    def __init__(self, rank: int, world: int, timeout: float, backend: str, pg=None) -> None:
        self.rank, self.world, self.timeout, self.backend = rank, world, float(timeout), backend
        self.pg = pg  # a gloo group for the CPU-side collectives (the default group when it is gloo)
        self.where = "start-up"  # what the run is doing, for error messages ("decoder layer 3 (model.layers.3)")

    # ---- who does what ------------------------------------------------------------------------------------
    def mine(self, n: int) -> list[int]:
        """The global indices of the ``n`` items (calibration batches, windows) this rank takes."""
        return list(range(self.rank, n, self.world))

    def deal(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each job: greedy, largest first, to the least loaded rank (ties to the lower
        rank), the same on every rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += costs[j]
        return owner

    # ---- collectives, each failure turned into one clean error ---------------------------------------------
    @contextmanager
    def _guard(self, what: str):
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError, OSError) as e:  # gloo: connection closed / timed out
            raise self._error(what, e) from None

    def _error(self, what: str, e: BaseException) -> DistributedError:
        msg = str(e)
        ranks = _missing_ranks(msg)
        if not ranks:
            ranks = self._probe()
        who = (f"rank {', '.join(map(str, ranks))}" if ranks else "another rank") + " stopped answering"
        return DistributedError(f"{who} during {self.where} ({what}); every rank stopped, nothing was written. "
                                f"Fix the cause and run the same command with --resume to continue from the last "
                                f"checkpoint (this rank: {self.rank} of {self.world}; timeout {self.timeout:.0f} s; "
                                f"{msg.splitlines()[0][:160] if msg else type(e).__name__})")

    def _probe(self) -> list[int]:
        """After a failed collective: which ranks no longer answer (rank 0 asks; [] when unknown)."""
        if self.rank != 0:
            return [0] if self.world == 2 else []
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.pg, timeout=datetime.timedelta(seconds=min(self.timeout, 5.0)),
                                   wait_all_ranks=True)
        except Exception as e:  # noqa: BLE001
            return _missing_ranks(str(e)) or ([1] if self.world == 2 else [])
        return []

    def check(self, what: str) -> None:
        """Every rank is here (a monitored barrier: rank 0 names the ranks that do not arrive in time)."""
        import torch.distributed as dist

        with self._guard(what):
            dist.monitored_barrier(group=self.pg, timeout=datetime.timedelta(seconds=self.timeout),
                                   wait_all_ranks=True)

    def sum_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """In-place sum over the ranks (float64 sums are exact enough to be order independent in fp32)."""
        import torch.distributed as dist

        with self._guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.pg)
        return t

    def extreme_(self, t: torch.Tensor, op: str, what: str) -> torch.Tensor:
        import torch.distributed as dist

        with self._guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=self.pg)
        return t

    def gather(self, obj: Any, what: str) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out: list = [None] * self.world
        with self._guard(what):
            dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj: Any, src: int, what: str) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        with self._guard(what):
            dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]

    def share(self, jobs: Sequence, fn: Callable[[Any], Any], cost: Callable[[Any], float], what: str) -> list:
        """``[fn(job) for job in jobs]``, each job computed by one rank (balanced by ``cost``) and its result
        broadcast to every rank."""
        owner = self.deal([float(cost(j)) for j in jobs])
        mine = {k: fn(j) for k, j in enumerate(jobs) if owner[k] == self.rank}
        return [self.broadcast(mine.get(k), owner[k], f"{what}, result {k + 1} of {len(jobs)}") for k in range(len(jobs))]

    # ---- tensors to and from rank 0 (the writer) -------------------------------------------------------------
    def to_rank0(self, local: list, indices: list[int], shapes: list, dtype, what: str) -> list | None:
        """Rank 0: every rank's tensors in global order (``shapes[g]``: tensor g's shape); the others: None."""
        import torch.distributed as dist

        with self._guard(what):
            if self.rank != 0:
                for t in local:
                    dist.send(t.contiguous(), dst=0, group=self.pg)
                return None
            out: list = [None] * len(shapes)
            for g, t in zip(indices, local):
                out[g] = t
            for r in range(1, self.world):
                for g in range(r, len(shapes), self.world):
                    out[g] = torch.empty(shapes[g], dtype=dtype)
                    dist.recv(out[g], src=r, group=self.pg)
            return out

    def from_rank0(self, tensors: list | None, indices: list[int], shapes: list, dtype, what: str) -> list:
        """Each rank gets its tensors (global ``indices``) of the list rank 0 holds."""
        import torch.distributed as dist

        with self._guard(what):
            if self.rank == 0:
                for r in range(1, self.world):
                    for g in range(r, len(tensors), self.world):
                        dist.send(tensors[g].contiguous(), dst=r, group=self.pg)
                return [tensors[g] for g in indices]
            out = []
            for g in indices:
                buf = torch.empty(shapes[g], dtype=dtype)
                dist.recv(buf, src=0, group=self.pg)
                out.append(buf)
            return out


def _missing_ranks(msg: str) -> list[int]:
    """The ranks a gloo monitored-barrier error names ("Ranks 1, 3 failed to pass monitoredBarrier")."""
    m = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", msg)
    if m:
        return sorted({int(x) for x in re.findall(r"\d+", m.group(1))})
    m = re.search(r"[Rr]ank (\d+) failed to pass", msg)
    return [int(m.group(1))] if m else []


def active() -> Group | None:
    """The running distributed group (None in one process)."""
    return _ACTIVE


def launched() -> bool:
    """True when this process was started by torchrun (or ``--workers``) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout: float | None = None, device: str | torch.device = "cpu") -> Group | None:
    """Join the run's process group from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); None in one process. Backend: gloo on CPU, nccl on CUDA (plus a gloo group for the
    CPU-side collectives and barriers)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if not launched():
        return None
    import torch.distributed as dist

    if timeout is None:
        timeout = float(os.environ.get("LLMQUANT_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    td = datetime.timedelta(seconds=timeout)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=td)
    except (RuntimeError, ValueError, ConnectionError, OSError) as e:
        raise DistributedError(f"could not join the distributed run (rank {os.environ.get('RANK')} of "
                               f"{os.environ.get('WORLD_SIZE')}, rendezvous at {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')}): {e}") from None
    pg = dist.new_group(backend="gloo", timeout=td) if backend != "gloo" else None
    _ACTIVE = Group(dist.get_rank(), dist.get_world_size(), timeout, backend, pg)
    log.info("rank %d of %d (%s), timeout %.0f s", _ACTIVE.rank, _ACTIVE.world, backend, timeout)
    return _ACTIVE


def shutdown() -> None:
    global _ACTIVE
    import torch.distributed as dist

    _ACTIVE = None
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a broken group after a failure: nothing to tear down cleanly)
            pass


def is_writer() -> bool:
    """True where outputs are written: one process, or rank 0."""
    return _ACTIVE is None or _ACTIVE.rank == 0


def split(items: Sequence) -> tuple[list[int], list]:
    """This rank's (global indices, items) of ``items``; all of them in one process."""
    g = _ACTIVE
    idx = list(range(len(items))) if g is None else g.mine(len(items))
    return idx, [items[i] for i in idx]


def sum_in_order(per_item: Iterable[tuple[int, Any]], what: str) -> list:
    """(global index, value) pairs of every rank, sorted by index: the values to add in one process's order."""
    local = list(per_item)
    g = _ACTIVE
    if g is None:
        return [v for _, v in sorted(local, key=lambda p: p[0])]
    got = [p for part in g.gather(local, what) for p in part]
    return [v for _, v in sorted(got, key=lambda p: p[0])]


def reduce_stats(col) -> None:
    """Sum a layer's input statistics (:class:`~llmquant.flows.stats.StatsCollector`) over the ranks, in
    place. A linear that saw no input on some rank (an expert no token of its batches was routed to) gets
    the others' sums there too."""
    from ..errors import CalibrationError
    from .stats import InputStats

    g = _ACTIVE
    if g is None:
        return
    local = sorted((n, o, col.stats[o].xtx.shape[0]) for n, o in col.owner.items())
    owner: dict[str, str] = {}
    width: dict[str, int] = {}
    for part in g.gather(local, "the statistics' layout"):
        for n, o, k in part:
            if owner.setdefault(n, o) != o:
                raise CalibrationError(f"{n} shares its input with {o} on one rank and with {owner[n]} on another")
            width[o] = k
    col.owner.update(owner)
    for o, k in width.items():
        if o not in col.stats:
            dev = next(iter(col.stats.values())).xtx.device if col.stats else "cpu"
            col.stats[o] = InputStats(k, dev)
    for o in sorted(width):
        st = col.stats[o]
        g.sum_(st.xtx, f"the input statistics of {o}")
        g.sum_(st.abs_sum, f"the input statistics of {o}")
        n = torch.tensor([st.n], dtype=torch.float64)
        st.n = int(g.sum_(n, f"the token count of {o}").item())


def share(jobs: Sequence, fn: Callable[[Any], Any], cost: Callable[[Any], float], what: str) -> list:
    """``[fn(job) for job in jobs]``: in a distributed run each job is done by one rank (balanced by
    ``cost``) and its result broadcast, so every rank gets every result."""
    g = _ACTIVE
    if g is None:
        return [fn(j) for j in jobs]
    return g.share(jobs, fn, cost, what)


def reduce_observer(obs, what: str) -> None:
    """Combine an observer's statistics over the ranks, in place and the same on every rank. Min-max:
    the extremes (exactly one process's); histogram-family: each rank's counts re-binned into the common
    range and added in rank order (the range is one process's; the counts may differ from one process's
    by the re-binning of a bin's worth); a moving average depends on the order of the batches: refused."""
    from ..errors import UnsupportedError
    from ..observers import HistogramObserver
    from ..observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver

    g = _ACTIVE
    if g is None:
        return
    if isinstance(obs, MovingAverageMinMaxObserver):
        raise UnsupportedError(f"the {obs.name} observer{obs._where()} averages over the batches in their order; a "
                               "distributed run splits them: use minmax or a histogram observer (mse, percentile)")
    hist = isinstance(obs, HistogramObserver)
    if not (hist or isinstance(obs, MinMaxObserver)):
        raise UnsupportedError(f"observer {type(obs).__name__}{obs._where()} cannot be combined across ranks")
    keys = ("min_val", "max_val", "lo", "hi", "hist") if hist else ("min_val", "max_val")
    parts = [p for p in g.gather({k: getattr(obs, k) for k in (*keys, "count", "out_shape")}, what)
             if p["min_val"] is not None]
    if not parts:
        return
    lo = parts[0]["min_val"]
    hi = parts[0]["max_val"]
    for p in parts[1:]:
        lo, hi = torch.minimum(lo, p["min_val"]), torch.maximum(hi, p["max_val"])
    obs.min_val, obs.max_val = lo, hi
    obs.count, obs.out_shape = sum(p["count"] for p in parts), parts[0]["out_shape"]
    if not hist:
        return
    if obs.scheme.symmetric:
        a = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -a, a
    total = None
    for p in parts:
        same = torch.equal(p["lo"], lo) and torch.equal(p["hi"], hi)
        if same:
            h = p["hist"].clone()
        else:
            obs.lo, obs.hi = p["lo"], p["hi"]
            h = obs._bin(obs.centers().float(), lo, hi, weights=p["hist"])
        total = h if total is None else total + h
    obs.lo, obs.hi, obs.hist = lo.clone(), hi.clone(), total
