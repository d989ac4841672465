"""Open a compare report in a real browser (headless Chromium), screenshot it, check it is not blank.

    apt-get install -y chromium        # Debian's package; once per machine
    .venv/bin/python benchmarks/check_report_html.py runs/compare/report.html

Exit status 0 when the screenshot shows a rendered page (enough non-white pixels and colours from the
plots), 1 otherwise. The screenshot is written next to the report (report.png).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(path: str) -> int:
    report = Path(path).resolve()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no chromium found: apt-get install -y chromium", file=sys.stderr)
        return 1
    shot = report.with_suffix(".png")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(shot))[..., :3]
    non_white = float((img.min(axis=2) < 0.95).mean())
    colours = len(np.unique((img * 15).round().reshape(-1, 3), axis=0))
    ok = non_white > 0.02 and colours > 20
    print(f"{shot}: {img.shape[1]}x{img.shape[0]}, {100 * non_white:.1f}% non-white pixels, {colours} colour bins: "
          f"{'rendered' if ok else 'BLANK'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare/report.html"))
