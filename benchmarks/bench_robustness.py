"""Robustness counts: bad inputs tried / clean errors, fuzz iterations per loader / crashes, kills at random
points / runs resumed identical / outputs lost.

    python benchmarks/bench_robustness.py --kills 12 --out benchmarks/results/robustness.json

- Bad inputs and fuzzing: the table-driven CLI test and the bounded loader fuzz test are run with pytest;
  each case or mutation that raises anything but one clean llmquant error (or a traceback) fails there.
- Kills: a GPTQ run on a tiny 4-layer Llama writing over an existing output is killed with SIGKILL at a
  random point (the Nth tensor written, N uniform over the whole run, final save included); then the
  previous output is checked (still there, loads, same sha256 as before) and the run is resumed with
  ``resume=True``: its tensors are compared with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


def _pytest_counts(test_file: str) -> tuple[int, int]:
    """(passed, failed) of one test file."""
    p = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / test_file)],
                       capture_output=True, text=True, cwd=ROOT)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    return passed, failed


def _kills(n: int, seed: int) -> dict:
    import torch

    import llmquant
    from conftest import make_tiny_llama
    from test_resume import GPTQ, VOCAB, _calib, _killed_run, _tensors

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="llmquant-kills-"))
    ckpt = work / "m"
    make_tiny_llama(vocab_size=VOCAB, layers=4).save_pretrained(str(ckpt), max_shard_size="60KB")

    def run(out, **kw):
        m, _ = llmquant.load_model(ckpt, stream=True)
        return llmquant.quantize(m, GPTQ, calib=_calib(), progress=False, output=out, shard_size="40KB",
                                 overwrite=True, **kw)

    import llmquant.io.shards as sh

    count = [0]
    orig = sh.ShardWriter.add

    def counting(self, name, t):
        count[0] += not name.startswith("x")
        return orig(self, name, t)

    sh.ShardWriter.add = counting
    try:
        run(work / "ref")
    finally:
        sh.ShardWriter.add = orig
    ref = _tensors(work / "ref")
    total_adds = count[0]
    rows = []
    for k in range(n):
        out = work / f"out{k}"
        m, _ = llmquant.load_model(ckpt, stream=True)
        llmquant.quantize(m, "W8", progress=False, output=out)  # the previous output the kill must not lose
        before = _tensors(out)
        point = rng.randint(1, total_adds)
        _killed_run(ckpt, out, f"add:{point}", GPTQ)
        lost = not (out / "llmquant.json").is_file() or _tensors(out) != before
        if not lost:
            llmquant.load(out)
        if llmquant.io.read_progress(out) is None:  # killed before the first layer was finished (or after the
            s = run(out)  # checkpoint was cleared in the final save): nothing to resume, the run starts over
            resumed = "nothing to resume"
        else:
            s = run(out, resume=True)
            resumed = s.resumed_after
        rows.append({"kill_at_tensor": point, "of": total_adds, "resumed_after_layer": resumed,
                     "identical": _tensors(out) == ref, "output_lost": lost})
    return {"tensors_written_per_run": total_adds, "runs": rows, "torch": torch.__version__}


def _overhead(methods: list[str]) -> list[dict]:
    """Time spent writing resume checkpoints within a default-model run writing an output (same run)."""
    import time

    import llmquant
    import llmquant.io.output as output

    rows = []
    for method in methods:
        seen = {}
        orig = output.OutputFolder.finish

        def finish(self, *a, **k):
            seen["checkpoint_s"] = self.checkpoint_seconds
            return orig(self, *a, **k)

        output.OutputFolder.finish = finish
        try:
            model, _ = llmquant.load_model()
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                llmquant.quantize(model, llmquant.QuantConfig(weight="W4G64", method=method), progress=False,
                                  output=Path(d) / "out")
                total = time.perf_counter() - t
        finally:
            output.OutputFolder.finish = orig
        rows.append({"method": method, "total_s": round(total, 1), "checkpoints_s": round(seen["checkpoint_s"], 2),
                     "share": round(seen["checkpoint_s"] / total, 4)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    ap.add_argument("--overhead", nargs="*", metavar="METHOD",
                    help="only measure the checkpoints' share of a default-model W4G64 run per method (e.g. rtn gptq)")
    a = ap.parse_args()
    if a.overhead:
        rows = _overhead(a.overhead)
        out = Path(a.out).with_name("resume_overhead.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        return
    from test_bad_inputs import CASES
    import test_fuzz_loaders as fz

    bad_ok, bad_fail = _pytest_counts("test_bad_inputs.py")
    fuzz_ok, fuzz_fail = _pytest_counts("test_fuzz_loaders.py")
    kills = _kills(a.kills, a.seed)
    runs = kills["runs"]
    res = {
        "bad_inputs": {"cli_cases": len(CASES), "tests_passed": bad_ok, "tests_failed": bad_fail},
        "fuzz": {"manifest_mutations": fz.MANIFEST_MUTATIONS, "gguf_reader_mutations": fz.GGUF_READER_MUTATIONS,
                 "gguf_load_mutations": fz.GGUF_LOAD_MUTATIONS, "tests_passed": fuzz_ok, "tests_failed": fuzz_fail},
        "kills": kills,
        "summary": {"kills": len(runs), "resumed_identical": sum(r["identical"] for r in runs),
                    "outputs_lost": sum(r["output_lost"] for r in runs)},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"| check | tried | clean |\n|---|---|---|\n"
          f"| bad CLI inputs (one clean line, exit 2) | {len(CASES)} cases ({bad_ok + bad_fail} tests) | "
          f"{'all' if not bad_fail else f'{bad_fail} tests failed'} |\n"
          f"| fuzzed manifests / GGUF headers / GGUF loads | {fz.MANIFEST_MUTATIONS} / {fz.GGUF_READER_MUTATIONS} / "
          f"{fz.GGUF_LOAD_MUTATIONS} | {'0 crashes' if not fuzz_fail else f'{fuzz_fail} tests failed'} |\n"
          f"| kill -9 at random points, then --resume | {len(runs)} | {res['summary']['resumed_identical']} "
          f"identical to an uninterrupted run, {res['summary']['outputs_lost']} outputs lost |")


if __name__ == "__main__":
    main()
