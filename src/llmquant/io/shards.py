"""Safetensors shards written as tensors come, and the folder swap that makes a save atomic.

:class:`ShardWriter` appends each tensor's bytes to the open shard's data file as soon as it is given
(hashing them on the way, so the manifest's sha256 costs no second read) and, when the shard reaches its
size, writes the shard: the safetensors header, then the data copied file to file. Memory use is one
tensor at a time whatever the model's size. One shard is named ``model.safetensors``; several are
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``, as Hugging Face writes them.

A :class:`FileSlice` is a tensor still in another safetensors file (a float embedding passed through from
a streamed checkpoint): its bytes are copied file to file, never read into memory.

:func:`swap_in` puts a finished temporary folder in the place of the output: one ``renameat2`` exchange
where the file system allows it (the old folder is never absent), else two renames.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptFileError, SchemeError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 10**9
_CHUNK = 16 << 20

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def parse_size(size: str | int | float | None, what: str = "size") -> int | None:
    """Bytes from ``2GB``, ``500MB``, ``1.5GiB``, ``123`` (bytes); None stays None."""
    if size is None or isinstance(size, (int, float)):
        if size is not None and (not math.isfinite(size) or size <= 0):
            raise SchemeError(f"{what} must be a positive number of bytes, got {size}")
        return None if size is None else int(size)
    s = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise SchemeError(f"{what} {size!r} is not a size; write it as e.g. 2GB, 500MB or 1.5GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise SchemeError(f"{what} must be positive, got {size!r}")
    return int(value)


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes in a file: ``nbytes`` from ``offset`` of ``path``."""

    path: str
    offset: int
    nbytes: int
    dtype: str  # safetensors' name (BF16, F32, ...)
    shape: tuple[int, ...]


def safetensors_slices(path: str | os.PathLike) -> dict[str, FileSlice]:
    """Where each tensor of a safetensors file lies in it, from its header (bounds checked)."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path} is too short to be a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CorruptFileError(f"{path}: its header length ({n} bytes) runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path}: its header is not JSON ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if not 0 <= begin <= end <= size - 8 - n:
            raise CorruptFileError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        out[name] = FileSlice(path, 8 + n + begin, end - begin, meta["dtype"], tuple(meta["shape"]))
    return out


def read_chunks(sl: FileSlice, chunk: int = _CHUNK):
    """The bytes of ``sl``, ``chunk`` at a time, with plain file reads (no mapping, nothing kept)."""
    with open(sl.path, "rb") as f:
        f.seek(sl.offset)
        left = sl.nbytes
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise CorruptFileError(f"{sl.path} ends inside a tensor: the file is truncated")
            yield data
            left -= len(data)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class ShardWriter:
    """Tensors into safetensors shards of at most ``shard_bytes`` each (a tensor larger than that gets a
    shard of its own) in ``folder``. ``add`` writes at once; ``close`` finishes the last shard and the
    index and returns ``{name: {"shape", "dtype", "sha256"}}`` for the manifest. ``metadata``: each shard's
    header metadata (default: ``producer: llmquant``, which marks a folder whose manifest it needs; a plain
    float checkpoint written with this class passes ``{"format": "pt"}``, so loaders take it as one)."""

    def __init__(self, folder: str | os.PathLike, shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt", "producer": "llmquant"}
        self.entries: dict[str, dict] = {}
        self.files: list[str] = []  # finished shards, in order
        self.weight_map: dict[str, str] = {}
        self._part = None
        self._header: dict[str, dict] = {}
        self._size = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice")
        if isinstance(tensor, FileSlice):
            dtype, shape, nbytes = tensor.dtype, tuple(tensor.shape), tensor.nbytes
        else:
            if tensor.dtype not in ST_DTYPES:
                raise SchemeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
            dtype, shape, nbytes = ST_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size()
        if self._part is not None and self._size and self._size + nbytes > self.shard_bytes:
            self._finish_shard()
        if self._part is None:
            self._part = open(self.folder / f".shard-{len(self.files):05d}.part", "wb")
            self._header, self._size = {}, 0
        h = hashlib.sha256()
        if isinstance(tensor, FileSlice):
            chunks = read_chunks(tensor)
        else:
            data = _tensor_bytes(tensor)
            chunks = (data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK))
        for chunk in chunks:
            h.update(chunk)
            self._part.write(chunk)
        self._header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes
        self.entries[name] = {"shape": list(shape), "dtype": str(TORCH_DTYPES[dtype]).replace("torch.", ""),
                              "sha256": h.hexdigest()}

    def _finish_shard(self) -> None:
        part = self._part
        part.flush()
        name = f".shard-{len(self.files):05d}.safetensors"
        header = dict(self._header)
        header["__metadata__"] = dict(self.metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(self.folder / name, "wb") as out, open(part.name, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            out.flush()
            left = self._size
            while left:  # file to file in the kernel; nothing comes through this process's memory
                n = os.copy_file_range(src.fileno(), out.fileno(), left) if hasattr(os, "copy_file_range") else 0
                if n <= 0:
                    shutil.copyfileobj(src, out, _CHUNK)
                    break
                left -= n
            out.flush()
            os.fsync(out.fileno())
        part.close()
        os.unlink(part.name)
        for k in self._header:
            self.weight_map[k] = name
        self.files.append(name)
        self._part, self._header, self._size = None, {}, 0

    def close(self) -> dict[str, dict]:
        """Finish the last shard, give the shards their final names, write the index when there are several."""
        if self._part is not None or not self.files:
            if self._part is None:  # nothing at all was written: an empty safetensors file
                self._part = open(self.folder / f".shard-{len(self.files):05d}.part", "wb")
            self._finish_shard()
        n = len(self.files)
        final = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        rename = dict(zip(self.files, final))
        for old, new in rename.items():
            os.replace(self.folder / old, self.folder / new)
        self.weight_map = {k: rename[v] for k, v in self.weight_map.items()}
        self.files = final
        if n > 1:
            total = sum((self.folder / f).stat().st_size for f in final)
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
        return self.entries

    def abort(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None

    def state(self) -> dict:
        """What is on disk so far, made durable (the open shard's data flushed and synced), as JSON: a
        killed run's writer continues from it (:meth:`restore`)."""
        if self._part is not None:
            self._part.flush()
            os.fsync(self._part.fileno())
        return {"files": list(self.files), "weight_map": dict(self.weight_map), "entries": dict(self.entries),
                "part": None if self._part is None else {"size": self._size, "header": dict(self._header)}}

    @classmethod
    def restore(cls, folder, shard_bytes: int | None, state: dict) -> "ShardWriter":
        """The writer as it was when ``state`` was taken, whatever was written after it. A shard that was
        finished after that point gives its data back to the open shard (the part file is cut to its
        recorded size); later shards are removed."""
        w = cls(folder, shard_bytes)
        w.files, w.weight_map, w.entries = list(state["files"]), dict(state["weight_map"]), dict(state["entries"])
        n = len(w.files)
        for f in [*w.folder.glob("model-*-of-*.safetensors"), w.folder / SINGLE]:  # a kill inside close():
            if f.is_file():  # the shards get their working names back
                i = 0 if f.name == SINGLE else int(f.name[len("model-"):].split("-")[0]) - 1
                os.replace(f, w.folder / f".shard-{i:05d}.safetensors")
        (w.folder / INDEX).unlink(missing_ok=True)
        for f in w.folder.glob(".shard-*"):
            idx = int(f.name[len(".shard-"):].split(".")[0])
            if idx > n or (idx == n and state["part"] is None):
                f.unlink()
        for f in w.files:
            if not (w.folder / f).is_file():
                raise CorruptFileError(f"the checkpoint in {w.folder} lists shard {f}, which is missing")
        part = state["part"]
        if part is not None:
            path, done = w.folder / f".shard-{n:05d}.part", w.folder / f".shard-{n:05d}.safetensors"
            if not path.exists():  # the shard was finished after the checkpoint: take its data back
                if not done.exists():
                    raise CorruptFileError(f"the checkpoint in {w.folder} lists data in {path.name}, which is missing")
                with open(done, "rb") as src, open(path, "wb") as out:
                    src.seek(8 + struct.unpack("<Q", src.read(8))[0])  # the data follows the header
                    shutil.copyfileobj(src, out, _CHUNK)
            if done.exists():
                done.unlink()
            if path.stat().st_size < part["size"]:
                raise CorruptFileError(f"{path} is shorter than the checkpoint says: the checkpoint is damaged")
            w._part = open(path, "r+b")
            w._part.truncate(part["size"])
            w._part.seek(part["size"])
            w._header, w._size = dict(part["header"]), int(part["size"])
        return w


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``. An existing ``out`` is exchanged with it in one step and
    then removed; where that is not possible it is moved aside first and put back if the second move fails."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


class OutputLock:
    """Held while one run writes ``out``: a second run writing the same output fails at once instead of
    interleaving. Taking the lock also clears what a killed run left beside ``out`` (temporary folders;
    an old folder moved aside is put back if ``out`` is missing)."""

    def __init__(self, out: Path) -> None:
        import fcntl

        from ..errors import OutputExistsError

        self.path = out.with_name(f".{out.name}.lock")
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise OutputExistsError(f"another llmquant run is writing {str(out)!r} right now; wait for it or choose "
                                    "another output folder") from None
        for old in sorted(out.parent.glob(f".{out.name}.old-*")):
            if not out.exists():
                os.replace(old, out)  # a run killed between its two renames: the previous output comes back
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
