"""Render a run's report.html in a real headless browser and save a screenshot, to look at the layout.

Writes the report (``lowbit.report.write_report``) of RUN, or, without RUN, of a fake finished run with
oscillation data (the one ``tests/test_report.py`` builds), opens it in headless Chromium and saves
``benchmarks/results/report_screenshot.png``. The run directory is copied to a temporary folder first, so
the run itself is not touched.

    .venv/bin/python benchmarks/report_browser.py [RUN] [--out PATH] [--height 4200]

Needs Debian's ``chromium`` (``apt-get install -y chromium``); fails with that hint when it is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_report import make_run  # noqa: E402

from lowbit.report import write_report  # noqa: E402


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("report_browser: no chromium on PATH: install it with `apt-get install -y chromium` (Debian/Ubuntu)")


def screenshot(browser: str, html: Path, out: Path, width: int, height: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={out}",
           f"--window-size={width},{height}", html.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or not out.is_file():
        sys.exit(f"report_browser: chromium failed (exit {p.returncode}):\n{p.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="run directory (default: a fake run with oscillation data)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "report_screenshot.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=4200)
    args = ap.parse_args()
    browser = find_chromium()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run = Path(tmp) / Path(args.run).name
            shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors"))
        else:
            run = make_run(Path(tmp))
        html = write_report(run)
        screenshot(browser, html, Path(args.out), args.width, args.height)
        size = html.stat().st_size
    print(f"{args.out}: screenshot of a {size:,}-byte report.html of {args.run or 'a fake run'}")


if __name__ == "__main__":
    main()
