"""llama.cpp's importance matrix ("imatrix") files, GGUF form: written from llmquant's calibration, read back.

An imatrix holds, for each weight that multiplies activations (llama.cpp's tensor names, e.g.
``blk.0.attn_q.weight``), the sum over the calibration tokens of each input column's squared activation
(``<name>.in_sum2``, float32, one row per expert) and the number of tokens (``<name>.counts``); the file's
``general.type`` is ``imatrix``, with ``imatrix.datasets`` (where the text came from),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (llama.cpp's ``llama-imatrix`` writes the same; its
``llama-quantize --imatrix FILE`` reads it). ``sum / count`` is the mean squared input of each column: the
weight of that column's rounding error in the layer's output error, which importance-weighted scale
search uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CorruptFileError, ExportError, OutputExistsError

IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    """Per weight (llama.cpp's tensor name): ``sums`` (n_mat, in_features) of squared inputs and ``counts``
    (n_mat,) of tokens (n_mat: 1, or the experts of a merged expert tensor)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def mean_square(self, name: str) -> np.ndarray:
        """(n_mat, in_features) mean squared input per column (zero where no token was seen)."""
        c = self.counts[name].astype(np.float64)[:, None]
        return np.where(c > 0, self.sums[name] / np.maximum(c, 1), 0.0)


def write_imatrix(im: ImportanceMatrix, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``im`` as llama.cpp's GGUF imatrix (tensors in name order, as llama.cpp writes them); atomic."""
    import gguf

    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{str(out)!r} exists; choose another file or pass overwrite")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", list(im.datasets) or ["unknown"])
        w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
        for name in sorted(im.sums):
            s = np.ascontiguousarray(im.sums[name], dtype=np.float32).reshape(-1, im.sums[name].shape[-1])
            c = np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
            w.add_tensor(name + IN_SUM2, s)
            w.add_tensor(name + COUNTS, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def read_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """An imatrix file (llama.cpp's GGUF form) as written by ``llama-imatrix`` or :func:`write_imatrix`."""
    import gguf

    p = Path(path).expanduser()
    if not p.is_file():
        raise CorruptFileError(f"no imatrix file at {str(p)!r}")
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001  (the reader raises bare ValueErrors and struct errors)
        raise CorruptFileError(f"{str(p)!r} is not a GGUF imatrix file (llama.cpp's older .dat form is not read): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def value(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        v = f.parts[f.data[0]]
        return bytes(v).decode("utf-8", "replace") if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]

    kind = value("general.type")
    if kind != "imatrix":
        raise CorruptFileError(f"{str(p)!r} is a GGUF file of type {kind!r}, not an imatrix")
    sums, counts = {}, {}
    for t in r.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(IN_SUM2):
            sums[t.name[: -len(IN_SUM2)]] = data.reshape(-1, data.shape[-1]).astype(np.float64)
        elif t.name.endswith(COUNTS):
            counts[t.name[: -len(COUNTS)]] = data.reshape(-1).astype(np.float64)
    bad = sorted(set(sums) ^ set(counts))
    if bad or not sums:
        raise CorruptFileError(f"{str(p)!r}: {'sums without counts, or counts without sums, for ' + str(bad[:3]) if bad else 'no entries'}")
    for n in sums:
        if sums[n].shape[0] != counts[n].shape[0]:
            raise CorruptFileError(f"{str(p)!r}: {n} has {sums[n].shape[0]} rows of sums and {counts[n].shape[0]} counts")
    return ImportanceMatrix(sums, counts, list(value("imatrix.datasets", []) or []), int(value("imatrix.chunk_count", 0)),
                            int(value("imatrix.chunk_size", 0)))


def gguf_names(model: nn.Module, names) -> dict[str, str]:
    """llama.cpp's weight name of each Hugging Face linear ``names`` (those GGUF has a place for)."""
    from ..models import arch_for
    from ..models.spec import hf_to_gguf_name

    arch = arch_for(model)
    if arch is None or arch.gguf is None:
        from ..models import model_types_with

        raise ExportError(f"{type(model).__name__}: llama.cpp's tensor names for this family are unknown to llmquant "
                          f"(known: {', '.join(model_types_with('gguf'))}), so no imatrix can name its weights")
    out = {}
    for n in names:
        g = hf_to_gguf_name(arch, f"{n}.weight")
        if g is not None:
            out[n] = g
    return out


def importance_for(model: nn.Module, im: ImportanceMatrix, names) -> dict[str, torch.Tensor]:
    """Each linear of ``names``' mean squared input per column, from ``im``; an imatrix of another model (names
    it lacks, widths that differ) is refused."""
    from ..errors import CalibrationError

    mapping = gguf_names(model, names)
    missing = [g for g in mapping.values() if g not in im.sums]
    if mapping and len(missing) == len(mapping):
        raise CalibrationError(f"the imatrix holds none of this model's weights (it names {sorted(im.sums)[:2]} ..., "
                               f"the model {sorted(mapping.values())[:2]} ...): it was made for another model")
    out = {}
    for n, g in mapping.items():
        if g not in im.sums:
            continue
        k = model.get_submodule(n).in_features
        ms = im.mean_square(g)
        if ms.shape != (1, k):
            raise CalibrationError(f"the imatrix entry {g} has {ms.shape[-1]} columns x {ms.shape[0]} matrices; {n} "
                                   f"takes {k} inputs: the imatrix was made for another model")
        out[n] = torch.from_numpy(ms[0]).float()
    return out


def imatrix_from_calibration(model: nn.Module, windows: torch.Tensor, *, dataset: str = "llmquant default text",
                             batch_size: int = 4, progress: bool = True) -> ImportanceMatrix:
    """The importance matrix of ``model``'s decoder-layer linears on token ``windows`` (n, seq_len), named as
    llama.cpp names them (what ``llama-imatrix`` computes on the same text)."""
    from ..flows.passes import model_device
    from ..flows.stats import input_square_sums
    from ..modules import select_linears

    chosen = dict(select_linears(model))
    mapping = gguf_names(model, chosen)
    dev = model_device(model)
    sums = input_square_sums(model, {n: chosen[n] for n in mapping}, [b.to(dev) for b in windows.split(batch_size)],
                             progress=progress)
    return ImportanceMatrix({mapping[n]: s.cpu().numpy()[None] for n, (s, _) in sums.items()},
                            {mapping[n]: np.array([float(c)]) for n, (_, c) in sums.items()},
                            [dataset], int(windows.shape[0]), int(windows.shape[1]))
