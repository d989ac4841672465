"""Bounded fuzzing of the two loaders that read files users hand in: a saved folder's ``llmquant.json`` and a
GGUF file. Fixed seeds, a few hundred mutations in all; whatever a mutation does, the only exceptions that
may come out are llmquant's own (LLMQuantError subclasses), and a damaged file is never half-accepted.

Also the tamper checks: a manifest edited by hand fails its digest, a folder without its manifest is refused.
"""

import copy
import json
import random
import shutil
import struct

import numpy as np
import pytest
import torch

import llmquant
from llmquant.cli import main
from llmquant.errors import CorruptFileError, LLMQuantError, ModelNotFoundError
from llmquant.io import read_manifest
from llmquant.io.manifest_schema import DIGEST_FIELD, manifest_digest

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MANIFEST_MUTATIONS = 160
GGUF_READER_MUTATIONS = 150
GGUF_LOAD_MUTATIONS = 24


# ---- a saved folder with every kind of manifest entry --------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Packed linears (symmetric, asymmetric, 8-bit), a bf16 linear, a quantized embedding tied to the head
    (aliases), and a recorded plan."""
    m = make_tiny_llama(vocab_size=400, hidden=64)
    plan = {"layers": {
        "model.layers.0.mlp.down_proj": "W8",
        "re:.*self_attn\\.k_proj": "bf16",
        "re:model\\.layers\\.1\\.mlp\\..*": "W4G32A",
        "re:.*": "W4G64",
        "model.embed_tokens": "W4G32",
        "lm_head": "W4G32",
    }}
    llmquant.quantize(m, plan, progress=False)
    d = tmp_path_factory.mktemp("fuzz") / "q"
    llmquant.save(m, None, d)
    return d


def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


REPLACEMENTS = [None, True, False, 0, -1, 1, 3, 2**31, 2**70, 1.5, -0.0, float("nan"), float("inf"), "", "x",
                "float32", "uint8", "W4G64", "model.layers.0", "0" * 64, [], [1, 2, 3], [-1], {}, {"a": 1}, ["x"]]


def _mutate(man: dict, rng: random.Random):
    """One random edit of a JSON value, type or key anywhere in the manifest; returns (manifest, what)."""
    m = copy.deepcopy(man)
    nodes = [(p, v) for p, v in _nodes(m) if p and p[0] != DIGEST_FIELD]
    path, val = rng.choice(nodes)
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.randrange(7)
    if op == 0:
        new = copy.deepcopy(rng.choice(REPLACEMENTS))
        parent[key] = new
        what = f"set {path} = {new!r}"
    elif op == 1:
        del parent[key]
        what = f"delete {path}"
    elif op == 2 and isinstance(parent, dict):
        parent[f"{key}x" if rng.random() < 0.5 else str(key).replace("0", "1")] = parent.pop(key)
        what = f"rename key {path}"
    elif op == 3:
        if isinstance(val, bool):
            new = not val
        elif isinstance(val, int):
            new = val + rng.choice([-1, 1, 7, -val - 1, val * 1000])
        elif isinstance(val, float):
            new = val * rng.choice([-1.0, 0.5, 1e30])
        elif isinstance(val, str):
            new = rng.choice([val + "x", val[: len(val) // 2], val.upper(), val[::-1]])
        elif isinstance(val, list):
            new = val[: len(val) // 2] if rng.random() < 0.5 else val + val[:1]
        elif isinstance(val, dict):
            new = {f"{k}y": v for k, v in val.items()}
        else:  # null
            new = 0
        parent[key] = new
        what = f"tweak {path}: {val!r:.40} -> {new!r:.40}"
    elif op == 4:
        other = copy.deepcopy(rng.choice(nodes)[1])
        parent[key] = other
        what = f"copy another value into {path}: {other!r:.60}"
    elif op == 5:
        parent[key] = [val] if rng.random() < 0.5 else {"value": val}
        what = f"wrap {path}"
    else:
        target = parent if isinstance(parent, dict) else m
        target[rng.choice(["extra", "tensors ", "scheme", "bits", "aliases"])] = copy.deepcopy(rng.choice(REPLACEMENTS))
        what = f"add a key beside {path}"
    return m, what


def _inspect_rc(folder, capsys) -> int:
    rc = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc


def test_manifest_fuzz(saved, tmp_path, capsys):
    """Mutated manifests, half re-signed (so the schema itself is exercised, not only the digest): load and
    inspect raise llmquant's own errors or succeed, agree with each other, and a loaded model runs."""
    rng = random.Random(1234)
    original = (saved / "llmquant.json").read_text()
    man = json.loads(original)
    assert man[DIGEST_FIELD] == manifest_digest(man)
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    counts = {"refused": 0, "loaded": 0, "digest": 0}
    for i in range(MANIFEST_MUTATIONS):
        mutated, what = _mutate(man, rng)
        resign = i % 2 == 0
        if resign and isinstance(mutated, dict):
            mutated[DIGEST_FIELD] = manifest_digest(mutated)
        changed = json.dumps(mutated, sort_keys=True) != json.dumps(man, sort_keys=True)
        (d / "llmquant.json").write_text(json.dumps(mutated))
        try:
            model, _ = llmquant.load(d)
        except LLMQuantError as e:
            load_error = e
        except Exception as e:  # noqa: BLE001  (the point of the test)
            pytest.fail(f"mutation #{i} ({what}) crashed load: {type(e).__name__}: {e}")
        else:
            load_error = None
            with torch.no_grad():
                assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
        if not resign and changed:
            assert isinstance(load_error, CorruptFileError) and DIGEST_FIELD in str(load_error), what
            counts["digest"] += 1
        rc = _inspect_rc(d, capsys)
        assert rc in (0, 2)
        # inspect refuses what load refuses (but the data's sha256, which only loading reads), and no more
        if load_error is None:
            assert rc == 0, f"mutation #{i} ({what}): inspect refused a folder load accepts"
            counts["loaded"] += 1
        else:
            assert rc == 2 or "fails its sha256 check" in str(load_error), \
                f"mutation #{i} ({what}): inspect accepted a folder load refuses ({load_error})"
            counts["refused"] += 1
    (d / "llmquant.json").write_text(original)
    llmquant.load(d)  # the untouched manifest still loads
    assert counts["refused"] > MANIFEST_MUTATIONS // 2 and counts["digest"] > MANIFEST_MUTATIONS // 3, counts


def test_manifest_edit_is_caught_and_old_folders_still_load(saved, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    man = json.loads((d / "llmquant.json").read_text())
    name, layer = next((n, l) for n, l in man["quantized_layers"].items() if l["scheme"]["symmetric"])
    edited = copy.deepcopy(man)
    edited["quantized_layers"][name]["scheme"]["restricted_range"] = not layer["scheme"]["restricted_range"]
    (d / "llmquant.json").write_text(json.dumps(edited, indent=1))
    for read in (llmquant.load, read_manifest, lambda f: llmquant.load_model(f)):
        with pytest.raises(CorruptFileError, match="manifest_sha256 check"):
            read(d)
    # a folder written before the digest existed has no such field: it loads, with the check skipped
    old = {k: v for k, v in man.items() if k != DIGEST_FIELD}
    (d / "llmquant.json").write_text(json.dumps(old))
    a, _ = llmquant.load(d)
    b, _ = llmquant.load(saved)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # the digest does not depend on formatting or key order
    assert manifest_digest(json.loads(json.dumps(man, indent=3))) == man[DIGEST_FIELD]


def test_deleted_manifest_is_refused_not_loaded_as_float(saved, tmp_path, tiny_bpe_tokenizer):
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    (d / "llmquant.json").unlink()
    with pytest.raises(CorruptFileError, match="manifest is missing"):
        llmquant.load_model(d)
    with pytest.raises(ModelNotFoundError, match="llmquant.json"):
        llmquant.load(d)
    # a Hugging Face folder lacking a weight is refused too (transformers would make it up)
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    make_tiny_llama(vocab_size=400, hidden=64).save_pretrained(str(hf))
    sd = load_file(str(hf / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match="lacks 1 weight.*model.norm.weight"):
        llmquant.load_model(hf)


# ---- GGUF ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=400, hidden=64)
    llmquant.quantize(m, "gguf:Q4_0", progress=False)
    p = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    llmquant.export(m, tiny_bpe_tokenizer, p, progress=False)
    return p


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _length_fields(buf: bytes):
    """Offsets and widths of every count, length, dimension and offset field of a (little-endian) GGUF
    header, found by a walk of our own, and where the header ends."""
    out = [(8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(pos):
        out.append((pos, 8))
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]

    def value(pos, t):
        if t in _SCALAR:
            return pos + _SCALAR[t]
        if t == 8:
            return string(pos)
        itype, n = struct.unpack_from("<IQ", buf, pos)
        out.append((pos + 4, 8))
        pos += 12
        for _ in range(n):
            pos = value(pos, itype)
        return pos

    for _ in range(n_kv):
        pos = string(pos)
        pos = value(pos + 4, struct.unpack_from("<I", buf, pos)[0])
    for _ in range(n_tensors):
        pos = string(pos)
        nd = struct.unpack_from("<I", buf, pos)[0]
        out.append((pos, 4))
        pos += 4
        out += [(pos + 8 * j, 8) for j in range(nd)]
        pos += 8 * nd
        out += [(pos, 4), (pos + 4, 8)]  # type, data offset
        pos += 12
    return out, pos


def _gguf_mutant(raw: bytes, fields, header_end: int, i: int, rng: random.Random):
    kind = i % 4
    if kind == 3:  # a bit flipped in a value (a key's text, a token, a name, a type) or in the tensor data,
        # not in a length: the header check passes and transformers' reader and tokenizer get the file
        lengths = {off + j for off, width in fields for j in range(width)}
        at = rng.choice([j for j in range(24, header_end) if j not in lengths]) if rng.random() < 0.7 else \
            rng.randrange(header_end, len(raw))
        b = bytearray(raw)
        b[at] ^= 1 << rng.randrange(7)
        return bytes(b), f"value flip at {at}"
    if kind == 0:  # byte flips, mostly in the header
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header_end) if rng.random() < 0.85 else rng.randrange(len(b))
            b[at] ^= 1 << rng.randrange(8)
        return bytes(b), "flip"
    if kind == 1:  # truncation
        return raw[: rng.choice([rng.randrange(header_end), rng.randrange(len(raw))])], "truncate"
    off, width = rng.choice(fields)  # a length field inflated (or zeroed)
    old = int.from_bytes(raw[off : off + width], "little")
    top = 2 ** (8 * width) - 1
    new = min(top, rng.choice([top, 2 ** (8 * width - 1), 2**32 + old, old * 2 + 1, old + 1, old + 8, len(raw), 0]))
    return raw[:off] + new.to_bytes(width, "little") + raw[off + width :], f"field at {off} {old} -> {new}"


def _read_everything(path):
    """What llmquant reads of a GGUF file besides the model: the checked reader, every key, the tensors'
    bytes, and the tokenizer copy `export --tokenizer-gguf` makes."""
    import gguf

    from llmquant.io.gguf_check import field_value, open_gguf
    from llmquant.io.gguf_tokenizer import copy_tokenizer_fields

    r = open_gguf(path)
    for key in list(r.fields):
        field_value(r, key, path)
    for t in r.tensors:
        np.asarray(t.data).view(np.uint8).sum()
    w = gguf.GGUFWriter(str(path) + ".out", "llama")
    copy_tokenizer_fields(w, path)


def test_gguf_reader_fuzz(gguf_file, tmp_path):
    raw = gguf_file.read_bytes()
    fields, header_end = _length_fields(raw)
    assert len(fields) > 400 and header_end < len(raw)
    _read_everything(gguf_file)  # the unmutated file reads
    rng = random.Random(99)
    refused = 0
    for i in range(GGUF_READER_MUTATIONS):
        data, what = _gguf_mutant(raw, fields, header_end, i, rng)
        p = tmp_path / "f.gguf"
        p.write_bytes(data)
        try:
            _read_everything(p)
        except LLMQuantError as e:
            assert str(p) in str(e), e  # the message names the file
            refused += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"GGUF mutation #{i} ({what}) crashed the reader: {type(e).__name__}: {e}")
    assert refused > GGUF_READER_MUTATIONS // 2


def test_gguf_load_fuzz(gguf_file, tmp_path, monkeypatch):
    """The whole load (header check, transformers' conversion, tokenizer, packed import) on mutated files."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    raw = gguf_file.read_bytes()
    fields, header_end = _length_fields(raw)
    rng = random.Random(7)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(GGUF_LOAD_MUTATIONS):
        data, what = _gguf_mutant(raw, fields, header_end, i, rng)
        p = tmp_path / f"m{i}.gguf"  # a name of its own: the conversion cache is keyed by name, size and time
        p.write_bytes(data)
        try:
            model, _ = llmquant.load_model(p, packed=i % 2 == 1)
        except LLMQuantError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"GGUF mutation #{i} ({what}) crashed load_model: {type(e).__name__}: {e}")
        else:
            outcomes["loaded"] += 1
            with torch.no_grad():  # flipped bits in the data may give any values, but the model runs
                assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 400)
    assert outcomes["refused"] >= GGUF_LOAD_MUTATIONS // 2, outcomes


def test_converted_gguf_cache_key_sees_a_rewrite_in_place(tmp_path):
    """The cache of converted GGUF files is keyed by a fingerprint that changes when the bytes change, even
    with the same size and modification time (a rewrite within one timestamp tick)."""
    import os

    from llmquant.io.hf import _fingerprint

    f = tmp_path / "m.gguf"
    f.write_bytes(bytes(3 << 20))
    st = f.stat()
    before = _fingerprint(f)
    assert _fingerprint(f) == before
    with open(f, "r+b") as h:  # one byte in the middle, same size, same mtime
        h.seek(st.st_size // 2)
        h.write(b"\x01")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and _fingerprint(f) != before
