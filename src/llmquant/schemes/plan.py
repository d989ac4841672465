"""A mixed-precision plan: an ordered map of module name or ``re:`` pattern -> storage format.

A plan file (JSON) is meant to be read and edited by hand::

    {
      "format": "llmquant-plan",
      "version": 1,
      "method": "rtn",
      "layers": {
        "model.layers.0.mlp.down_proj": "W8",
        "re:.*self_attn\\.(k|v)_proj": "bf16",
        "re:.*": "W4G64"
      },
      "info": {"budget": "...", "predicted_kl": 0.03}
    }

Rules are tried in order and the first match wins. An exact name selects that module (a Linear, or an
Embedding: embeddings and the output head are only ever selected by exact name; ``re:`` patterns select
the Linears inside the model, never the output head). Values: ``"bf16"``, ``"fp16"``, ``"fp32"`` (leave
as is), a preset (``"W8"``, ``"W4G64"``, ...) or a scheme dict. ``info`` is free-form (the planner writes
its budget and predictions there) and is ignored when the plan is applied. ``"method"``: ``"rtn"`` (the
default, no data), ``"gptq"`` (calibrated: every linear solved onto its own format in one layer-by-layer
pass; ``"params"`` holds GPTQ's knobs, e.g. ``{"damp": 0.05}``; left out: GPTQ's defaults) or ``"awq"``
(calibrated: AWQ's scales searched for each group of linears sharing an input, each weighed on its own
format, then each linear's clipping search onto its format; ``"params"``: AWQ's knobs) or ``"qat"`` (the
formats made by RTN, then trained end to end under fake quantization, each linear in its own format, by
distilling the float model; ``"params"``: QAT's knobs, e.g. ``{"steps": 200}``). An rtn plan's
``"params"`` may name an importance matrix: ``{"observer": "imse", "imatrix": "imatrix.gguf"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import SchemeError, SelectionError
from .formats import Format, format_name, format_to_json, resolve_format
from .methods import params_to_json, resolve_method_params
from .names import check_patterns, matches

PLAN_VERSION = 1
PLAN_FORMAT = "llmquant-plan"
#: how a plan's integer formats are made: RTN (data-free), GPTQ / AWQ on the calibration data (every linear
#: onto its own format in one layer-by-layer pass), or QAT (every linear trained in its own format)
PLAN_METHODS = ("rtn", "gptq", "awq", "qat")


@dataclass(frozen=True)
class Plan:
    rules: tuple[tuple[str, Format], ...]  # (exact name or "re:pattern", format), first match wins
    method: str = "rtn"  # how integer formats are made: one of PLAN_METHODS
    info: dict = field(default_factory=dict, compare=False)
    version: int = PLAN_VERSION
    params: Any = None  # the method's knobs (GPTQParams / AWQParams / QATParams; None: its defaults)

    def __post_init__(self) -> None:
        rules = []
        for pat, fmt in self.rules:
            if not isinstance(pat, str) or not pat:
                raise SchemeError(f"plan keys are module names or 're:' patterns, got {pat!r}")
            check_patterns((pat,), " in the plan")
            rules.append((pat, resolve_format(fmt)))
        if not rules:
            raise SchemeError("the plan has no layers; give at least one 'module name or re:pattern: format'")
        object.__setattr__(self, "rules", tuple(rules))
        if self.method not in PLAN_METHODS:
            raise SchemeError(f"a plan's method is one of {', '.join(PLAN_METHODS)} (how its integer formats are "
                              f"made), got {self.method!r}")
        if self.method != "rtn" or self.params is not None:  # stored resolved: the knobs it was made with
            object.__setattr__(self, "params", resolve_method_params(self.method, self.params))
        if self.method == "rtn" and self.params is not None and self.params.calibrated:
            raise SchemeError("an rtn plan's importance-weighted search ('imse') takes its importance from an "
                              "imatrix file (imatrix=); for a plan made on calibration data use method 'gptq' or 'awq'")
        if self.version != PLAN_VERSION:
            raise SchemeError(f"plan version {self.version} is not supported (this llmquant reads {PLAN_VERSION})")

    @property
    def calibrated(self) -> bool:
        """Whether applying the plan needs calibration data (its method does)."""
        return self.method in ("gptq", "awq")

    # ---- serialization ------------------------------------------------------------------------
    @classmethod
    def from_layers(cls, layers: Mapping[str, Any], **kw: Any) -> "Plan":
        return cls(rules=tuple(layers.items()), **kw)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "method": self.method,
            "layers": {p: format_to_json(f) for p, f in self.rules},
            "info": self.info,
            **({"params": params_to_json(self.params)} if self.params is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if not isinstance(d, Mapping) or not isinstance(d.get("layers"), (Mapping, list)):
            raise SchemeError('a plan is a JSON object with a "layers" object mapping module names or re: patterns to formats')
        layers = d["layers"].items() if isinstance(d["layers"], Mapping) else d["layers"]  # or [[key, format], ...]
        unknown = set(d) - {"format", "version", "method", "layers", "info", "params"}
        if unknown:
            raise SchemeError(f"unknown plan fields {sorted(unknown)}")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise SchemeError(f"not an llmquant plan (format {d.get('format')!r})")
        return cls(rules=tuple(tuple(kv) for kv in layers), method=d.get("method", "rtn"), info=dict(d.get("info") or {}),
                   version=d.get("version", PLAN_VERSION), params=d.get("params"))

    def to_ordered_dict(self) -> dict:
        """to_dict with ``layers`` as a list of [key, format] pairs: keeps the order through sort_keys."""
        d = self.to_dict()
        d["layers"] = [[p, f] for p, f in d["layers"].items()]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise SchemeError(f"the plan is not valid JSON: {e}") from None

    def save(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path).expanduser()
        if not p.is_file():
            raise SchemeError(f"plan file {str(p)!r} does not exist; write one with `llmquant plan` or by hand")
        return cls.from_json(p.read_text())

    # ---- use ----------------------------------------------------------------------------------
    def resolve(self, candidates: Mapping[str, Any], head_names: tuple[str, ...] = ()) -> dict[str, Format]:
        """{module name: format} for the modules in ``candidates`` (name -> module, in model order).

        ``head_names`` (embeddings and the output head) are selected by exact name only. Raises
        :class:`SelectionError` for an exact name that is not a quantizable module or a rule that
        matches nothing."""
        out: dict[str, Format] = {}
        used = [False] * len(self.rules)
        for name in candidates:
            for i, (pat, fmt) in enumerate(self.rules):
                hit = matches(name, (pat,)) and not (pat.startswith("re:") and name in head_names)
                if hit:
                    used[i] = True
                    out[name] = fmt
                    break
        missing = [p for (p, _), u in zip(self.rules, used) if not u and not p.startswith("re:")]
        if missing:
            raise SelectionError(
                f"the plan names modules that are not Linear/Embedding layers of this model: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; check the names with `llmquant sensitivity` or model.named_modules()"
            )
        unmatched = [p for (p, _), u in zip(self.rules, used) if not u]
        if unmatched:
            raise SelectionError(f"plan patterns match no layer of this model: {unmatched[:5]}")
        return out

    def summary(self) -> str:
        return ", ".join(f"{p}: {format_name(f)}" for p, f in self.rules[:6]) + (" ..." if len(self.rules) > 6 else "")


def is_plan_like(spec: Any) -> bool:
    """True for a Plan, a dict with a "layers" map, or a path to a .json plan file."""
    if isinstance(spec, Plan):
        return True
    if isinstance(spec, Mapping) and "layers" in spec:
        return True
    return isinstance(spec, (str, Path)) and str(spec).endswith(".json")


def resolve_plan(spec: Any) -> Plan:
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, Mapping):
        return Plan.from_dict(spec)
    return Plan.load(spec)
