"""Bounds-checked reading of a GGUF file's header, before anything trusts it.

The ``gguf`` package's ``GGUFReader`` (which transformers uses too) takes every length in the header at its
word: a string length, an array count or a tensor's dimensions inflated by one flipped byte make it read
past the end of the file, loop over billions of items, or map a tensor that is not there, and it fails,
when it fails, with ``struct.error``, ``IndexError`` or ``ValueError`` from deep inside. :func:`check_gguf`
walks the same header (magic, version, counts, key/value pairs, tensor records) with each length bounded by
the bytes left in the file *before* it is used, checks value types, UTF-8 keys and strings, the alignment,
and that every tensor's data (its type's block size times its dimensions) lies inside the file; it raises
:class:`CorruptFileError` naming the file and what is wrong. :func:`open_gguf` runs it, then ``GGUFReader``.
Layout (GGUF v2/v3): https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptFileError, LLMQuantError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
STRING, ARRAY = 8, 9
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
UINT32 = 4
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
DEFAULT_ALIGNMENT = 32


@dataclass
class GGUFTensorRecord:
    name: str
    dims: tuple[int, ...]  # GGUF order (fastest-varying first)
    type: int  # GGMLQuantizationType value
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    path: str
    version: int
    byte_order: str  # "<" little endian, ">" big endian
    keys: list[str] = field(default_factory=list)
    tensors: list[GGUFTensorRecord] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    file_size: int = 0


class _Cursor:
    """Reads little or big endian values from ``buf``, refusing to read past its end."""

    def __init__(self, buf, path: str, order: str = "<"):
        self.buf, self.path, self.order, self.pos = buf, path, order, 0

    def fail(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path} is not a valid GGUF file: {what}; the file is truncated or damaged "
                                "(download or export it again)")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str):
        if n < 0 or n > self.left():
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, {self.left()} are left")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, {self.left()} are left")
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack(self.order + "I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack(self.order + "Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > self.left():
            raise self.fail(f"{what} at byte {self.pos} claims {n} bytes, {self.left()} are left")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not UTF-8 text") from None

    def count(self, what: str, min_item: int) -> int:
        """A count of items each at least ``min_item`` bytes long, bounded by the bytes left."""
        n = self.u64(what)
        if n * min_item > self.left():
            raise self.fail(f"{what} is {n}, but {self.left()} bytes are left (at least {n * min_item} needed)")
        return n


def _min_size(vtype: int) -> int:
    return SCALAR_SIZES.get(vtype) or (8 if vtype == STRING else 12)


def _value(c: _Cursor, vtype: int, what: str, depth: int = 0):
    """Skip (and check) one value of type ``vtype``; returns it for scalars and strings (None for arrays)."""
    if vtype in SCALAR_SIZES:
        raw = c.take(SCALAR_SIZES[vtype], what)
        return int.from_bytes(raw, "little" if c.order == "<" else "big") if vtype == UINT32 else None
    if vtype == STRING:
        return c.string(what)
    if vtype == ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise c.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        itype = c.u32(f"the item type of {what}")
        if itype not in SCALAR_SIZES and itype not in (STRING, ARRAY):
            raise c.fail(f"{what} has items of unknown type {itype}")
        n = c.count(f"the item count of {what}", _min_size(itype))
        if itype in SCALAR_SIZES:
            c.skip(n * SCALAR_SIZES[itype], what)
        else:
            for i in range(n):
                _value(c, itype, f"{what}[{i}]", depth + 1)
        return None
    raise c.fail(f"{what} has unknown value type {vtype}")


def check_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Walk the header of the GGUF file ``path`` with every length checked against the file size; raise
    :class:`CorruptFileError` for anything a reader would trip on. Returns what the header says."""
    from gguf import GGML_QUANT_SIZES

    p = Path(path).expanduser()
    where = str(p)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            if size == 0:
                raise CorruptFileError(f"{where} is empty, not a GGUF file; download or export it again")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _walk(mm, where, size, GGML_QUANT_SIZES)
    except OSError as e:
        raise CorruptFileError(f"{where} cannot be read ({e.strerror or e})") from None


def _walk(buf, where: str, size: int, quant_sizes) -> GGUFHeader:
    c = _Cursor(buf, where)
    try:
        if bytes(c.take(4, "the magic number")) != MAGIC:
            raise c.fail("it does not start with the GGUF magic number")
        raw_version = bytes(c.take(4, "the version"))
        version = struct.unpack("<I", raw_version)[0]
        if version & 0xFFFF == 0:  # written on a big-endian machine, as GGUFReader reads it
            c.order = ">"
            version = struct.unpack(">I", raw_version)[0]
        if version not in VERSIONS:
            raise c.fail(f"version {version} (llmquant reads GGUF versions {VERSIONS})")
        h = GGUFHeader(path=where, version=version, byte_order=c.order, file_size=size)
        n_tensors = c.u64("the tensor count")
        n_kv = c.count("the key/value count", 8 + 4 + 1)
        if n_tensors * (8 + 4 + 4 + 8) > c.left():
            raise c.fail(f"the tensor count is {n_tensors}, more than the {c.left()} bytes left can describe")
        seen: set[str] = set()
        for i in range(n_kv):
            key = c.string(f"key #{i}")
            if key in seen:
                raise c.fail(f"key {key!r} appears twice")
            seen.add(key)
            vtype = c.u32(f"the value type of {key!r}")
            v = _value(c, vtype, f"the value of {key!r}")
            if key == "general.alignment":
                if vtype != UINT32 or not v or v & (v - 1):
                    raise c.fail(f"general.alignment must be a power of two stored as uint32, got {v!r} (type {vtype})")
                h.alignment = v
            h.keys.append(key)
        names: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"the name of tensor #{i}")
            if name in names:
                raise c.fail(f"tensor {name!r} appears twice")
            names.add(name)
            nd = c.u32(f"the dimension count of {name!r}")
            if not 1 <= nd <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {nd} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(c.u64(f"dimension {j} of {name!r}") for j in range(nd))
            ttype = c.u32(f"the type of {name!r}")
            offset = c.u64(f"the data offset of {name!r}")
            if any(d < 1 for d in dims):
                raise c.fail(f"tensor {name!r} has a dimension of 0: {list(dims)}")
            sizes = quant_sizes.get(_ggml_type(ttype))
            if sizes is None:
                raise c.fail(f"tensor {name!r} has unknown type {ttype}")
            block, type_size = sizes
            if dims[0] % block:
                raise c.fail(f"tensor {name!r}: its row of {dims[0]} values is not a whole number of {block}-value blocks")
            n = 1
            for d in dims:
                n *= d
            h.tensors.append(GGUFTensorRecord(name, dims, ttype, offset, n // block * type_size))
        h.data_offset = -(-c.pos // h.alignment) * h.alignment
        for t in h.tensors:
            if t.offset % h.alignment:
                raise c.fail(f"tensor {t.name!r}: data offset {t.offset} is not a multiple of the alignment {h.alignment}")
            end = h.data_offset + t.offset + t.nbytes
            if end > size:
                raise c.fail(f"tensor {t.name!r} ({t.nbytes} bytes at {h.data_offset + t.offset}) ends at byte {end}, "
                             f"past the end of the file ({size} bytes)")
        return h
    finally:
        c.buf = b""


def _ggml_type(v: int):
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(v)
    except ValueError:
        return None


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` over ``path`` after :func:`check_gguf` passed; whatever the reader still raises
    becomes :class:`CorruptFileError` naming the file."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        return GGUFReader(str(Path(path).expanduser()))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
        log.debug("GGUFReader failed on %s", path, exc_info=True)
        raise CorruptFileError(f"{path} is not a valid GGUF file ({type(e).__name__}: {_first_line(e)}); "
                               "download or export it again") from None


def field_value(reader, key: str, path, default=None, *, required: bool = False):
    """The value of header key ``key`` (its ``contents()``), with a damaged value as CorruptFileError."""
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise CorruptFileError(f"{path} has no {key!r} key: not a model GGUF file, or a damaged one")
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: the value of {key!r} cannot be read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


def wrap_gguf_errors(path, what: str):
    """A context manager turning what a third-party reader raises on a damaged GGUF file into
    :class:`CorruptFileError` (llmquant's own errors pass through)."""
    return _Wrap(path, what)


class _Wrap:
    def __init__(self, path, what):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if e is None or isinstance(e, LLMQuantError) or not isinstance(e, Exception):
            return False
        if isinstance(e, (MemoryError, RecursionError, NotImplementedError, ImportError)):
            return False
        log.debug("%s failed on %s", self.what, self.path, exc_info=(tp, e, tb))
        raise CorruptFileError(f"{self.path}: {self.what} failed ({tp.__name__}: {_first_line(e)}); the file is "
                               "damaged, or a GGUF this version of transformers does not read") from None
