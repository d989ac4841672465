"""Per-layer sensitivity: the damage of storing one layer alone in each candidate format.

Damage is the mean over predicted positions of KL(p_float || p_perturbed) on calibration windows taken
from the end of the text (:func:`llmquant.data.windows`, disjoint from evaluation). Three measures:

``"kl"``      exact: the layer's weight is replaced by its quantized version and the model run again; from
              the cached input of the layer's decoder block, so only that block and the ones after it run.
              Cost: about (units x candidates x 0.6) forwards of the calibration tokens.
``"fisher"``  second-order estimate of that KL (default; about 40x cheaper). For a small change dz of the
              logits, KL(p || p+dz) ~ 1/2 dz^T F dz with F the Fisher matrix of the softmax,
              F = E_{y~p}[g g^T], g = d log p(y) / dz. Moving one layer's weight by dW changes the logits
              of every later position, so summed over positions, with labels y_t drawn from the model,
              KL_total ~ 1/2 E_y[(<G_y, dW>)^2],   G_y = d/dW sum_t log p_t(y_t),
              since the cross terms between positions vanish in expectation (E_y[g] = 0). One backward per
              drawn label set gives G_y for every layer at once. A single draw's (<G_y, dW>)^2 is one
              chi-square sample (very noisy), and a planner picking minima from noisy numbers picks the
              ones that came out low by chance; so the damage used is the diagonal form
              1/2 sum_ij E_y[G_ij^2] dW_ij^2 (the Fisher-weighted squared error of HAWQ-V2, Dong et al.
              2020, and SqueezeLLM, Kim et al. 2023), which averages over every weight of the layer and
              equals the full form in expectation when rounding errors are uncorrelated. The full-rank
              estimate is kept in ``extra["fisher_full"]``.
``"kfac"``    the Fisher estimate in Kronecker-factored form (Martens & Grosse 2015): for a linear layer,
              F ~ A (x) H with A the second moment of the sampled log-likelihood's gradients at the layer's
              outputs and H = sum_t x_t x_t^T of its calibration inputs, so the damage is
              1/2 sum_o A_o (dW H dW^T)_oo / T. It weighs an error by the directions the layer's inputs
              actually take, as GPTQ's objective does, so it can measure GPTQ-made candidates
              (``quantizer="gptq"``: each layer solved by GPTQ onto each format with that H), whose errors
              are large weight by weight but cancel on the inputs. Cost about that of ``"fisher"``, plus two
              GPTQ solves per (layer, format) for GPTQ candidates: those are cross-fitted, solved on the
              even windows' H and weighed by the odd windows' moments and the other way round (measured on
              its own calibration tokens a GPTQ solution looks far better than it is on other text: with
              fewer tokens than inputs it can put its whole error where those tokens do not look).
              ``quantizer="awq"``: each layer's AWQ scale and clipping searched for each format on the
              same statistics (its inputs' Gram matrix and mean magnitudes), cross-fitted in the same way.

QAT-made candidates (``quantizer="qat"``, with ``"kfac"`` or ``"kl"``; :mod:`.qat_candidates`): for each
integer candidate format, one QAT run of a copy of the model with every planned layer in that format (a
uniform plan applied by QAT, :class:`~llmquant.schemes.QATParams` as ``params``); each layer's candidate is
its trained, dequantized weight, measured alone with the rest of the model float. The runs train on the
tokens *before* the measurement windows (those are the text's last ``windows x seq_len`` tokens), so no
measured token was trained on and no cross-fitting is needed; ``QATParams.text`` is not used for them (it is
carried into the plan). Float candidates (bf16 / fp16) are rounded, as a QAT plan keeps such layers;
formats QAT cannot train (k-quants, a stored float minimum as gguf:Q4_1) are refused. Each format's trained
weights are cached (``<cache>/qat``), so another measure or a subset of the formats trains nothing. A
distributed run (``"kfac"`` only, as for GPTQ / AWQ candidates) trains each format on every rank together.
Cost: one QAT run per integer format on top of the measure. A plan made from it is a QAT plan with the
same knobs. Caveat: QAT trains the layers jointly, each repairing the others' errors, while the damage is
measured one layer at a time: it ranks layers by what they keep after training, not what they contribute
to the trained whole.

Damages add up across layers to first order, so a plan's predicted KL is the sum of its layers' damages.
Results are cached on disk (``$LLMQUANT_CACHE/sensitivity``) keyed by model weights, text and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import SchemeError
from ...data import resolve_text, tokenize, windows as cut_windows
from ...models import arch_for, tied_lm_head
from ...modules import select_linears, tensor_bytes, unique_stored, weights_held
from ...resources import cache_dir
from ...schemes.formats import DEFAULT_CANDIDATES, FP32, fake_weight, format_bytes, format_name, gguf_type, resolve_format
from ...schemes import QuantConfig
from ..heads import head_format, head_names

log = logging.getLogger(__name__)
CACHE_VERSION = 5  # 3: label samples drawn per window (a seeded generator each); 4: fixed bytes with the int8 head; 5: unfit GGUF types not measured


@dataclass
class Unit:
    name: str  # plan key
    modules: tuple[str, ...]  # modules that take the unit's format (a tied head: head and embedding)
    shape: tuple[int, int]
    block: int | None = None  # decoder block index (None: outside the blocks)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Sensitivity:
    """damage[u][c]: mean KL per predicted token when unit u alone is stored in candidate c."""

    candidates: list[str]
    units: list[Unit]
    damage: list[list[float]]
    nbytes: list[list[int]]  # stored bytes of unit u in candidate c
    method: str
    seconds: float
    tokens: int
    fixed_bytes: int  # bytes of everything the plan does not choose (norms, biases, the embedding / head in the default head format)
    fp32_bytes: int  # whole model in fp32
    key: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units"] = [asdict(u) for u in self.units]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        d = dict(d)
        d["units"] = [Unit(u["name"], tuple(u["modules"]), tuple(u["shape"]), u.get("block")) for u in d["units"]]
        return cls(**d)

    def save(self, path) -> Path:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict()))
        return p

    @classmethod
    def load(cls, path) -> "Sensitivity":
        return cls.from_dict(json.loads(Path(path).expanduser().read_text()))

    def without(self, names) -> "Sensitivity":
        """The same measurements with the units ``names`` left out of planning (kept as they are, in fp32)."""
        drop = set(names)
        keep = [i for i, u in enumerate(self.units) if u.name not in drop]
        freed = sum(format_bytes(FP32, *u.shape) for u in self.units if u.name in drop)
        return Sensitivity(
            candidates=list(self.candidates), units=[self.units[i] for i in keep], damage=[self.damage[i] for i in keep],
            nbytes=[self.nbytes[i] for i in keep], method=self.method, seconds=self.seconds, tokens=self.tokens,
            fixed_bytes=self.fixed_bytes + freed, fp32_bytes=self.fp32_bytes, key=self.key, extra=dict(self.extra),
        )

    def rows(self) -> list[dict]:
        """One table row per unit: its damage under each candidate."""
        return [{"layer": u.name, **{c: self.damage[i][j] for j, c in enumerate(self.candidates)}}
                for i, u in enumerate(self.units)]

    def agreement(self, other: "Sensitivity") -> dict:
        """Rank agreement (Spearman) of two measures over the (unit, candidate) pairs they share."""
        pos = {(u.name, c): (i, j) for i, u in enumerate(other.units) for j, c in enumerate(other.candidates)}
        a, b, per = [], [], {}
        for i, u in enumerate(self.units):
            for j, c in enumerate(self.candidates):
                if (u.name, c) in pos:
                    k, l = pos[(u.name, c)]
                    a.append(self.damage[i][j])
                    b.append(other.damage[k][l])
                    per.setdefault(c, ([], []))
                    per[c][0].append(self.damage[i][j])
                    per[c][1].append(other.damage[k][l])
        return {
            "pairs": len(a),
            "spearman": spearman(a, b),
            "spearman_per_candidate": {c: spearman(x, y) for c, (x, y) in per.items() if len(x) > 2},
        }


def spearman(a, b) -> float:
    """Spearman rank correlation (ties broken by order; enough for continuous damages)."""
    if len(a) < 2:
        return float("nan")
    ra = torch.empty(len(a)); ra[torch.tensor(a, dtype=torch.float64).argsort()] = torch.arange(len(a), dtype=torch.float32)
    rb = torch.empty(len(b)); rb[torch.tensor(b, dtype=torch.float64).argsort()] = torch.arange(len(b), dtype=torch.float32)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


# ---- units -------------------------------------------------------------------------------------
def plan_units(model: nn.Module, *, include_head: bool = False, targets=(), ignore=("lm_head",)) -> list[Unit]:
    """The layers a plan chooses formats for: the selected Linears (lm_head ignored by default) and, with
    ``include_head``, the output head and embedding (one unit, stored once, when they are tied)."""
    heads = head_names(model)
    ignore = tuple(ignore) + (heads if include_head else ())
    arch = arch_for(model)
    prefix = f"{arch.layers}." if arch else None

    def block_of(name: str):
        if prefix and name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0])
        return None

    units = [Unit(n, (n,), tuple(m.weight.shape), block_of(n)) for n, m in select_linears(model, targets, ignore)]
    if include_head and heads:
        if tied_lm_head(model) and len(heads) == 2:
            emb, head = heads
            units.append(Unit(head, (head, emb), tuple(model.get_submodule(head).weight.shape)))
        else:
            units += [Unit(h, (h,), tuple(model.get_submodule(h).weight.shape)) for h in heads]
    return units


def _weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    return model.get_submodule(unit.modules[0]).weight


def _fingerprint(model: nn.Module, units: list[Unit]) -> str:
    h = hashlib.sha256()
    for u in units:
        w = _weight(model, u).detach()
        h.update(f"{u.name}{tuple(w.shape)}{float(w.double().sum()):.10e}".encode())
        h.update(w.flatten()[:256].float().numpy().tobytes())
    return h.hexdigest()


def _streamed_fingerprint(model: nn.Module) -> str:
    """A streamed model's weights are in its checkpoint: its path, size and time, and the config."""
    src = getattr(model, "llmquant_source", None)
    p = Path(src) if src and src != "default" else None
    files = [] if p is None else sorted(f for f in p.glob("*") if f.is_file()) if p.is_dir() else [p]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files] or [src]
    cfg = getattr(model, "config", None)
    return hashlib.sha256(json.dumps([stamp, None if cfg is None else cfg.to_json_string()]).encode()).hexdigest()


def _fixed_bytes(model: nn.Module, units: list[Unit]) -> tuple[int, int]:
    """(bytes the model stores besides the units' weights, the model's fp32 bytes), summed from what each
    module stores (:mod:`llmquant.modules.storage`) as ``llmquant.model_size`` sums it."""
    total = params = 0
    for mod, fresh in unique_stored(model):
        total += tensor_bytes(fresh)
        params += weights_held(mod, fresh)
    fixed = total - tensor_bytes(_weight(model, u) for u in units)
    # an embedding / head the plan leaves out is stored as quantize() stores it by default (QuantConfig.head)
    planned = {m for u in units for m in u.modules}
    seen: set[int] = set()
    for n in head_names(model):
        w = getattr(model.get_submodule(n), "weight", None)
        if n in planned or not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())  # a tied pair once, however its tensors are wrapped
        fmt = head_format(QuantConfig(), w.shape[1])
        if fmt is not None:
            fixed += format_bytes(fmt, *w.shape) - tensor_bytes([w])
    return fixed, 4 * params


def _tokens(tokenizer, text) -> tuple[torch.Tensor, str]:
    """(1-D token ids, a hash of the text for the cache key) of ``text`` or of token ids (a tensor)."""
    if isinstance(text, torch.Tensor):  # already tokenized
        tokens = text.flatten().long()
        return tokens, hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    if tokenizer is None:
        raise SchemeError("sensitivity needs a tokenizer: pass tokenizer= or load the model with llmquant.load_model")
    raw = resolve_text(text)
    return tokenize(tokenizer, raw), hashlib.sha256(raw.encode()).hexdigest()


def _windows(tokenizer, text, n: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """(calibration windows, a hash of the text for the cache key) of ``text`` or of token ids (a tensor):
    the last ``n x seq_len`` tokens (:func:`llmquant.data.windows`, ``split="calib"``)."""
    tokens, key = _tokens(tokenizer, text)
    return cut_windows(tokens, n, seq_len, split="calib"), key


# ---- measures ----------------------------------------------------------------------------------
def _logits(model, ids):
    try:
        out = model(ids, use_cache=False)  # a KV cache would carry keys from one run into the next
    except TypeError:
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out)[:, :-1].float()


@torch.no_grad()
def _kl_scan(model, units, fmts, ids, progress, make=None, cross_fit=False):
    """Measured KL of each unit in each format. A distributed run: each rank runs its share of the windows
    (one batch) and the sums are added in rank order (one process's up to the rounding of the batched
    products). ``cross_fit`` (GPTQ / AWQ candidates; one process): the windows in two folds (even, odd);
    each unit is made from one fold's input statistics and its KL measured on the other, the two averaged (a
    solution measured on its own calibration tokens fits them, not the text)."""
    from .. import distributed

    if cross_fit:
        from .kfac import _folds, _grams

        folds = _folds(ids)
        grams = [_grams(model, units, ids[f]) for f in folds]
        per = [_kl_sums(model, units, fmts, ids[folds[b]], progress, make, grams[1 - b]) for b in (0, 1)]
        ns = [len(f) * (ids.shape[1] - 1) for f in folds]
        return [[max(0.0, 0.5 * sum(per[b][i][j] / ns[b] for b in (0, 1))) for j in range(len(fmts))]
                for i in range(len(units))]
    mine, _ = distributed.split(ids)
    n = ids.shape[0] * (ids.shape[1] - 1)
    sums = _kl_sums(model, units, fmts, ids[mine], progress, make) if mine else [[0.0] * len(fmts) for _ in units]
    total = distributed.sum_in_order([(mine[0] if mine else len(ids), sums)], "the KL sums")
    return [[max(0.0, sum(t[i][j] for t in total)) / n for j in range(len(fmts))] for i in range(len(units))]


def _kl_sums(model, units, fmts, ids, progress, make=None, H=None):
    """``make(fmt, w0, inputs, unit=)``: the stored weight (default: the format's RTN), given ``H[unit's module]``
    (its :class:`~.kfac.Inputs` on the other fold)."""
    make = make or (lambda f, w0, inp, unit=None: fake_weight(f, w0))
    H = H or {}
    arch = arch_for(model)
    blocks = model.get_submodule(arch.layers) if arch else None
    inputs: dict[int, tuple] = {}
    hooks = []
    if blocks is not None:
        for i, blk in enumerate(blocks):
            def pre(mod, args, kwargs, i=i):
                inputs[i] = (args, kwargs)
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        ref = F.log_softmax(_logits(model, ids), -1)
    finally:
        for h in hooks:
            h.remove()

    def run_from(b: int | None):
        if b is None or b not in inputs:
            return _logits(model, ids)
        args, kwargs = inputs[b]
        h = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for j in range(b, len(blocks)):
            out = blocks[j](h, *args[1:], **kw)
            h = out[0] if isinstance(out, tuple) else out
        h = model.get_submodule(arch.final_norm)(h)
        return model.get_submodule(arch.lm_head)(h)[:, :-1].float()

    damage = []
    for u in tqdm(units, desc="sensitivity (kl)", disable=not progress, leave=False):
        w = _weight(model, u)
        orig = w.detach().clone()
        row = []
        for f in fmts:
            if not _fits(f, orig.shape[-1]):
                row.append(math.inf)
                continue
            w.data.copy_(make(f, orig, H.get(u.modules[0]), unit=u))
            logp = F.log_softmax(run_from(u.block), -1)
            row.append(float(F.kl_div(logp, ref, log_target=True, reduction="sum")))  # >= 0 up to rounding
        w.data.copy_(orig)
        damage.append(row)
    return damage


def _fits(fmt, width: int) -> bool:
    """Whether ``fmt`` can hold rows of ``width`` values: a GGUF type whose blocks do not fill the rows
    (a k-quant on a width that is not a multiple of 256) cannot be written, and is not measured."""
    return gguf_type(fmt) is None or gguf_type(fmt, width) is not None


MEASURES = ("fisher", "kfac", "kl")
QUANTIZERS = ("rtn", "gptq", "awq", "qat")
KEEP_DELTAS = 1 << 30  # bytes of k-quant weight changes kept between windows (their search is slow)


class _Deltas:
    """dW of storing a unit's weight in a format (float32, flat), by (unit, candidate); the k-quants' kept
    while within KEEP_DELTAS (the others are cheap to remake, so memory stays at one layer's worth)."""

    def __init__(self) -> None:
        self.kept: dict = {}
        self.nbytes = 0

    def get(self, f, w0, key):
        if key in self.kept:
            return self.kept[key]
        d = fake_weight(f, w0).float().flatten() - w0.float().flatten()
        if getattr(f, "super_group", None) is not None and self.nbytes + 4 * d.numel() <= KEEP_DELTAS:
            self.kept[key] = d
            self.nbytes += 4 * d.numel()
        return d


def _flush(weights, fmts, grads, acc, diag, deltas: _Deltas) -> None:
    """Add, for each stored gradient G, (<G, dW_c>)^2 to acc[unit, c] and <G*G, dW_c*dW_c> to diag[unit, c]
    (the stored gradients are bf16); candidates that cannot hold a unit's rows are skipped (infinite damage)."""
    for i, w in enumerate(weights):
        w0 = w.detach()
        G = torch.stack([g[i] for g in grads]).flatten(1)  # (k, n) bf16
        G2 = G.float().pow(2).sum(0)
        for c, f in enumerate(fmts):
            if not _fits(f, w0.shape[-1]):
                acc[i, c] = diag[i, c] = math.inf
                continue
            d = deltas.get(f, w0, (i, c))
            acc[i, c] += ((G @ d.to(torch.bfloat16)).double() ** 2).sum()
            diag[i, c] += float(G2 @ d.pow(2))
        del G, G2


def _fisher_scan(model, units, fmts, ids, samples, progress, seed=0, flush_every=4):
    """Each window's sums are made on their own (its label samples drawn from a generator seeded by the
    window's index) and added in window order: the same damages whichever process of a distributed run
    measures which windows (:mod:`llmquant.flows.distributed` deals them out)."""
    from .. import distributed

    weights = [_weight(model, u) for u in units]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in {id(w): w for w in weights}.values():
        w.requires_grad_(True)
    mine, _ = distributed.split(ids)
    deltas = _Deltas()  # k-quant weight changes, made once
    parts = []  # (window, its (diag, acc) sums, its positions)
    bar = tqdm(total=len(mine) * samples, desc="sensitivity (fisher)", disable=not progress, leave=False)
    try:
        for i in mine:
            gen = torch.Generator().manual_seed(seed * 1000003 + i)
            acc = torch.zeros(len(units), len(fmts), dtype=torch.float64)
            diag = torch.zeros_like(acc)
            pending = []
            with torch.enable_grad():
                logp = F.log_softmax(_logits(model, ids[i][None])[0], -1)
                probs = logp.detach().exp()
                for s in range(samples):
                    y = torch.multinomial(probs, 1, generator=gen)
                    grads = torch.autograd.grad(logp.gather(1, y).sum(), weights, retain_graph=s < samples - 1,
                                                allow_unused=True)  # an expert no token was routed to: no gradient
                    pending.append([torch.zeros_like(w, dtype=torch.bfloat16) if g is None else g.detach().to(torch.bfloat16)
                                    for g, w in zip(grads, weights)])
                    del grads
                    bar.update(1)
                    if len(pending) == flush_every:
                        _flush(weights, fmts, pending, acc, diag, deltas)
                        pending = []
            if pending:
                _flush(weights, fmts, pending, acc, diag, deltas)
            parts.append((i, (diag, acc, logp.shape[0])))
            del logp, probs
    finally:
        bar.close()
        for p, r in saved.items():
            p.requires_grad_(r)
    acc = torch.zeros(len(units), len(fmts), dtype=torch.float64)
    diag = torch.zeros_like(acc)
    n = 0
    for d, a, k in distributed.sum_in_order(parts, "the Fisher sums"):
        diag, acc, n = diag + d, acc + a, n + k
    scale = 0.5 / (samples * max(n, 1))
    return (scale * diag).tolist(), (scale * acc).tolist()


def sensitivity(
    model: nn.Module,
    text=None,
    candidates=DEFAULT_CANDIDATES,
    *,
    method: str = "fisher",
    tokenizer=None,
    windows: int | None = None,
    seq_len: int = 128,
    samples: int = 2,
    include_head: bool = False,
    targets=(),
    ignore=("lm_head",),
    cache: bool | str | Path = True,
    progress: bool = True,
    quantizer: str = "rtn",
    params=None,
    gptq=None,
) -> Sensitivity:
    """Damage of storing each layer alone in each candidate format (see the module docstring).

    ``text``: None (default text), a path, a string, or a 1-D tensor of token ids. ``windows`` x ``seq_len`` calibration tokens from
    the end of the text (default 4 x 128). ``method``: one of :data:`MEASURES`. ``quantizer``: how each
    candidate's weight is made, ``"rtn"``, ``"gptq"`` (GPTQ on the calibration windows' Hessian) or
    ``"awq"`` (AWQ's scale and clipping searched on the calibration windows' statistics) or ``"qat"`` (one
    QAT run per integer format, every planned layer in it, trained on the text before the measurement
    windows: :mod:`.qat_candidates`); ``params``: that quantizer's knobs (:class:`~llmquant.schemes.GPTQParams`
    / :class:`~llmquant.schemes.AWQParams` / :class:`~llmquant.schemes.QATParams` or their dict; None: the
    defaults; ``gptq=`` is the same for GPTQ). GPTQ, AWQ and QAT candidates are measured with ``"kfac"`` or
    ``"kl"``: the diagonal Fisher form weighs each weight's error alone, blind to errors that cancel on the
    layer's inputs (what GPTQ solves for and training learns), and does not gather the inputs' statistics
    GPTQ and AWQ need. A plan made from such a sensitivity is applied with the same method and knobs
    (``plan_from_sensitivity`` takes them from it).
    ``cache``: True (default cache folder), False, or a folder.
    """
    from .. import distributed

    progress = progress and distributed.is_writer()  # a distributed run: rank 0 shows the progress
    if method not in MEASURES:
        raise SchemeError(f"sensitivity method must be one of {', '.join(map(repr, MEASURES))}, got {method!r}")
    if quantizer not in QUANTIZERS:
        raise SchemeError(f"sensitivity quantizer must be one of {', '.join(map(repr, QUANTIZERS))}, got {quantizer!r}")
    if quantizer == "qat" and method == "fisher":
        raise SchemeError("quantizer='qat' needs method='kfac' (or the exact 'kl'): the diagonal Fisher form weighs "
                          "each weight's error alone, blind to the errors training shapes to cancel on the layer's "
                          "inputs")
    if quantizer != "rtn" and method == "fisher":
        raise SchemeError(f"quantizer={quantizer!r} needs method='kfac' (or the exact 'kl'): the diagonal Fisher form "
                          "weighs each weight's error alone (it cannot see how GPTQ's errors cancel on the layer's "
                          "inputs) and does not gather the inputs' statistics GPTQ and AWQ are made from")
    if quantizer != "rtn" and method == "kl" and distributed.active() is not None:
        raise SchemeError(f"the exact 'kl' measure of {quantizer.upper()} candidates runs in one process; use "
                          "method='kfac' in a distributed run")
    if gptq is not None:
        if quantizer != "gptq" or params is not None:
            raise SchemeError("gptq= (GPTQ's knobs) goes with quantizer='gptq' (and not with params=)")
        params = gptq
    qparams = None
    if quantizer != "rtn":
        from ...schemes.methods import resolve_method_params

        qparams = resolve_method_params(quantizer, params)
    elif params is not None:
        raise SchemeError("params= (the quantizer's knobs) goes with quantizer='gptq', 'awq' or 'qat'")
    fmts = [resolve_format(c) for c in candidates]
    if not fmts:
        raise SchemeError("give at least one candidate format")
    if quantizer == "qat":
        from .qat_candidates import check_formats

        check_formats(fmts)
    names = [format_name(f) for f in fmts]
    windows = windows or 4
    all_ids, text_key = _tokens(tokenizer or getattr(model, "llmquant_tokenizer", None), text)
    ids = cut_windows(all_ids, windows, seq_len, split="calib")  # the last windows x seq_len tokens
    units = plan_units(model, include_head=include_head, targets=targets, ignore=ignore)
    streamed = getattr(model, "llmquant_layer_source", None) is not None
    if streamed and method != "fisher":
        raise SchemeError("a streamed model's sensitivity is measured with method='fisher' (the exact 'kl' measure "
                          "runs the model once per layer and format; 'kfac' keeps every layer's input moments); "
                          "load the model whole for 'kl' or 'kfac'")
    settings = {"v": CACHE_VERSION, "model": _streamed_fingerprint(model) if streamed else _fingerprint(model, units),
                "text": text_key,
                "candidates": names, "method": method, "windows": windows, "seq_len": seq_len,
                "samples": samples if method != "kl" else None, "units": [u.name for u in units]}
    if quantizer != "rtn":  # (absent for RTN: the keys of earlier caches stay valid)
        from ...schemes.methods import params_to_json

        settings["quantizer"] = {"name": quantizer, "params": params_to_json(qparams), "cross_fit": quantizer != "qat"}
        if quantizer == "qat":
            settings["quantizer"]["trained_on"] = "the tokens before the measurement windows"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    folder = None if cache is False else (cache_dir() / "sensitivity" if cache is True else Path(cache).expanduser())
    if folder is not None and (folder / f"{key}.json").is_file():
        try:
            res = Sensitivity.load(folder / f"{key}.json")
            log.info("sensitivity read from cache %s", folder / f"{key}.json")
            return res
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cached sensitivity unreadable (%s); measuring again", e)
    t0, c0 = time.perf_counter(), time.process_time()
    was_training = model.training
    model.eval()
    extra_damage: dict = {}
    from .kfac import _kfac_scan, _quantizer

    cross_fit = quantizer in ("gptq", "awq")  # calibrated on half the windows, measured on the other half
    if quantizer == "qat":  # trained on the tokens before the measurement windows (the text's last ones)
        from .qat_candidates import qat_candidates

        end = all_ids.numel() - ids.numel()
        assert torch.equal(all_ids[end:], ids.flip(0).reshape(-1)), "the measurement windows are the text's end"
        make = qat_candidates(model, units, fmts, all_ids[:end], qparams, fingerprint=settings["model"],
                              text_key=text_key, folder=folder, progress=progress)
        extra_damage["qat"] = {"train_tokens": [0, end], "measured_tokens": [end, int(all_ids.numel())],
                               "formats": make.info}
    else:
        make = _quantizer(quantizer, qparams)
    if method == "kl":
        damage = _kl_scan(model, units, fmts, ids, progress, make, cross_fit=cross_fit)
    elif method == "kfac":
        damage = _kfac_scan(model, units, fmts, ids, samples, progress, make, cross_fit=cross_fit)
    else:
        if streamed:
            from .streamed import fisher_scan_streamed

            damage, full = fisher_scan_streamed(model, units, fmts, ids, samples, progress)
        else:
            damage, full = _fisher_scan(model, units, fmts, ids, samples, progress)
        extra_damage["fisher_full"] = full
    model.train(was_training)
    fixed, fp32 = _fixed_bytes(model, units)
    res = Sensitivity(
        candidates=names, units=units, damage=damage,
        nbytes=[[format_bytes(f, *u.shape) for f in fmts] for u in units],
        method=method, seconds=time.perf_counter() - t0, tokens=int(ids.shape[0] * (ids.shape[1] - 1)),
        fixed_bytes=fixed, fp32_bytes=fp32, key=key,
        extra={"settings": settings, "cpu_seconds": time.process_time() - c0, "threads": torch.get_num_threads(),
               **extra_damage},
    )
    log.info("sensitivity (%s) of %d layers x %d candidates in %.1fs", method, len(units), len(fmts), res.seconds)
    if folder is not None and distributed.is_writer():
        try:
            res.save(folder / f"{key}.json")
        except OSError as e:
            log.warning("could not cache the sensitivity: %s", e)
    return res
