#!/usr/bin/env python3
"""Load a matrix report's index.html in headless Chromium and fail on console errors.

    python3 scripts/check_report_html.py [reports/latest/index.html] [--screenshot report.png] [--chromium PATH]

Checks, in order (exit 1 at the first failure, with the cause; exit 2 when Chromium is missing):
1. static: the page parses as well-formed XML after the doctype, has no <script>, and references nothing over
   http(s) (self-contained, no network);
2. Chromium ``--dump-dom``: exit 0, the DOM has the report's <h1>, and Chromium's stderr (``--enable-logging=stderr``)
   has no ``CONSOLE`` message (the page has no JavaScript, so any console message is an error), no "Uncaught",
   no "Failed to load resource", no "Refused to";
3. optionally a full-page screenshot (``--screenshot``) for a person to look at.
Install Chromium on Debian/Ubuntu with ``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

BAD_LOG = re.compile(r":CONSOLE[:(]|Uncaught|Failed to load resource|Refused to", re.I)


def chromium_cmd(chromium: str, profile: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr",
            "--v=0"]


def static_check(page: str) -> list[str]:
    problems = []
    body = page.split("\n", 1)[1] if page.startswith("<!DOCTYPE") else page
    try:
        ET.fromstring(body)
    except ET.ParseError as exc:
        problems.append(f"not well-formed: {exc}")
    if "<script" in page.lower():
        problems.append("contains <script>")
    ext = re.findall(r"(?:src|href)\s*=\s*[\"'](https?:[^\"']+)", page, re.I)
    if ext:
        problems.append(f"references network resources: {ext[:5]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="reports/latest/index.html", type=Path)
    ap.add_argument("--screenshot", type=Path, help="also write a PNG screenshot here")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--no-static", action="store_true", help="skip step 1 (to test the console check itself)")
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"FAIL: {args.html} does not exist", file=sys.stderr)
        return 1
    page = args.html.read_text()
    problems = [] if args.no_static else static_check(page)
    if problems:
        print("FAIL (static): " + "; ".join(problems), file=sys.stderr)
        return 1
    if not args.chromium:
        print("chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    url = args.html.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([*chromium_cmd(args.chromium, profile), "--dump-dom", url], capture_output=True,
                              text=True, timeout=args.timeout)
    bad = [ln for ln in proc.stderr.splitlines() if BAD_LOG.search(ln)]
    if proc.returncode != 0:
        print(f"FAIL: chromium exited {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return 1
    if bad:
        print("FAIL: console errors:\n" + "\n".join(bad[:20]), file=sys.stderr)
        return 1
    if "moe-compat matrix report" not in proc.stdout or "</html>" not in proc.stdout:
        print(f"FAIL: the rendered DOM lacks the report heading (got {len(proc.stdout)} chars)", file=sys.stderr)
        return 1
    print(f"OK: {args.html} rendered in headless {args.chromium} ({len(proc.stdout)} chars of DOM), "
          f"no console messages")
    if args.screenshot:
        with tempfile.TemporaryDirectory() as profile:
            shot = subprocess.run([*chromium_cmd(args.chromium, profile), "--hide-scrollbars",
                                   "--window-size=1500,1800", f"--screenshot={args.screenshot.resolve()}", url],
                                  capture_output=True, text=True, timeout=args.timeout)
        if shot.returncode != 0 or not args.screenshot.exists():
            print(f"FAIL: screenshot failed (exit {shot.returncode}): {shot.stderr[-1000:]}", file=sys.stderr)
            return 1
        print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
