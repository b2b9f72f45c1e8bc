#!/usr/bin/env python3
"""Check a csn report in a real headless browser (Debian's chromium): it renders, every image loads, no console errors.

    python3 scripts/check_report.py runs/fmnist/report/index.html [--screenshot page.png]

How: a temporary copy of the page (outside the report folder, with a <base href> pointing back at it
so relative image paths resolve as in the original) gets a small inline probe script as the first
thing in <head>. The probe records window errors, failed resource loads and console.error /
console.warn calls, and on the load event writes what it saw (images loaded, their natural sizes,
headings, page height) as JSON into a <pre> element. Chromium's --dump-dom prints the DOM after the
page has loaded; the JSON is read back from it. With --screenshot, a second chromium call photographs
the original page at the page's full height. No Python dependency beyond the standard library.

Exit status: 0 all checks passed; 1 a check failed (each failure is printed on its own line);
2 bad input (no such file, no chromium).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--allow-file-access-from-files"]
MARK = "__csn_report_check__"

PROBE = r"""<script>
(function () {
  var errors = [], warnings = [];
  function txt(a) { try { return Array.prototype.map.call(a, function (x) {
      return (x && x.stack) ? String(x.stack) : (typeof x === "object" ? JSON.stringify(x) : String(x)); }).join(" ");
    } catch (e) { return "(unprintable)"; } }
  var oe = console.error, ow = console.warn;
  console.error = function () { errors.push("console.error: " + txt(arguments)); return oe.apply(console, arguments); };
  console.warn = function () { warnings.push("console.warn: " + txt(arguments)); return ow.apply(console, arguments); };
  window.addEventListener("error", function (ev) {
    var t = ev.target;
    if (t && t !== window && (t.src || t.href)) { errors.push("failed to load " + (t.tagName || "?").toLowerCase() + " " + (t.src || t.href)); }
    else { errors.push("uncaught error: " + (ev.message || "?") + " at " + (ev.filename || "?") + ":" + (ev.lineno || 0)); }
  }, true);
  window.addEventListener("unhandledrejection", function (ev) { errors.push("unhandled rejection: " + txt([ev.reason])); });
  function report() {
    var imgs = Array.prototype.slice.call(document.images).filter(function (i) { return !i.hasAttribute("data-csn-probe"); });
    var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                  .map(function (i) { return i.getAttribute("src"); });
    var external = Array.prototype.slice.call(document.querySelectorAll("[src],link[href]"))
      .map(function (e) { return e.getAttribute("src") || e.getAttribute("href"); })
      .filter(function (u) { return /^(https?:)?\/\//i.test(u || ""); });
    var out = {
      title: document.title,
      h1: Array.prototype.map.call(document.querySelectorAll("h1"), function (h) { return h.textContent.trim(); }),
      h2: Array.prototype.map.call(document.querySelectorAll("h2"), function (h) { return h.textContent.trim(); }),
      images: imgs.length,
      images_loaded: imgs.length - bad.length,
      broken_images: bad,
      sizes: imgs.map(function (i) { return [i.getAttribute("src"), i.naturalWidth, i.naturalHeight]; }),
      external: external,
      errors: errors, warnings: warnings,
      height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
      text_length: document.body ? document.body.innerText.length : 0
    };
    var pre = document.createElement("pre");
    pre.id = "MARK"; pre.style.display = "none";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () { setTimeout(report, 50); });
})();
</script>""".replace("MARK", MARK)


def find_chromium(explicit: str | None = None) -> str | None:
    """The chromium binary: --chromium, $CHROMIUM, or a standard Debian path."""
    for c in ([explicit] if explicit else []) + [os.environ.get("CHROMIUM", "")] + list(CHROMIUM_CANDIDATES):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe_page(page: Path, chromium: str, *, timeout: float = 90.0, width: int = 1280) -> dict:
    """Load a copy of the page with the probe injected; return the probe's JSON (raises RuntimeError)."""
    src = page.read_text(encoding="utf-8")
    base = f'<base href="{html.escape(page.resolve().parent.as_uri() + "/", quote=True)}">'
    inject = base + PROBE
    m = re.search(r"<head[^>]*>", src, flags=re.I)
    patched = (src[: m.end()] + inject + src[m.end():]) if m else inject + src
    with tempfile.TemporaryDirectory(prefix="csn-check-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(patched, encoding="utf-8")
        profile = Path(tmp) / "profile"
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000",
               "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()]
        try:
            proc = _run(cmd, timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"chromium did not finish loading the page within {timeout:g} s") from None
    m = re.search(rf'<pre id="{MARK}"[^>]*>(.*?)</pre>', proc.stdout, flags=re.S)
    if not m:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        raise RuntimeError("the page did not finish loading in chromium (no probe result in the DOM; exit "
                           f"{proc.returncode}): {' | '.join(tail) or 'no output'}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, chromium: str, out: Path, *, height: int, width: int = 1280, timeout: float = 90.0) -> None:
    """Photograph the page (the original file) at width x height into out (PNG)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="csn-shot-") as tmp:
        cmd = [chromium, *FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}", f"--window-size={width},{height}",
               "--virtual-time-budget=10000", f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        try:
            proc = _run(cmd, timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"chromium did not take the screenshot within {timeout:g} s") from None
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {(proc.stderr or '').strip()[-300:]}")


def check(result: dict, *, min_images: int = 0) -> list[str]:
    """The failed checks, one sentence each (empty: all passed)."""
    fails = []
    if not result.get("h1"):
        fails.append("the page has no <h1>: it did not render as a csn report.")
    if result.get("text_length", 0) < 50:
        fails.append("the page shows (almost) no text.")
    for src in result.get("broken_images", []):
        fails.append(f"image did not load: {src}")
    if result.get("images", 0) < min_images:
        fails.append(f"expected at least {min_images} images, found {result.get('images', 0)}.")
    for u in result.get("external", []):
        fails.append(f"the page references the network: {u}")
    for e in result.get("errors", []):
        fails.append(f"console error: {e}")
    return fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a csn HTML report in headless chromium: renders, every image "
                                             "loads, no console errors, nothing fetched from the network.")
    ap.add_argument("page", help="the report's index.html")
    ap.add_argument("--screenshot", metavar="PNG", help="also save a full-height screenshot of the page here")
    ap.add_argument("--width", type=int, default=1280, help="browser window width in pixels [1280]")
    ap.add_argument("--max-height", type=int, default=16000, help="cap on the screenshot height in pixels [16000]")
    ap.add_argument("--min-images", type=int, default=0, help="fail when the page has fewer images than this")
    ap.add_argument("--chromium", help="path of the chromium binary [/usr/bin/chromium]")
    ap.add_argument("--json", action="store_true", help="print the probe's full result as JSON")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per chromium call [90]")
    args = ap.parse_args(argv)

    page = Path(args.page)
    if page.is_dir():
        page = page / "index.html"
    if not page.is_file():
        print(f"error: {page} does not exist; pass the report's index.html (written by `csn report`).", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: chromium not found; install it with `apt-get install -y chromium` (scripts/setup.sh does).",
              file=sys.stderr)
        return 2
    try:
        result = probe_page(page, chromium, timeout=args.timeout, width=args.width)
    except RuntimeError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    fails = check(result, min_images=args.min_images)
    if args.screenshot:
        h = max(600, min(int(result.get("height") or 2000) + 20, args.max_height))
        try:
            screenshot(page, chromium, Path(args.screenshot), height=h, width=args.width, timeout=args.timeout)
        except RuntimeError as e:
            fails.append(str(e))
    if fails:
        for f in fails:
            print(f"FAIL: {f}", file=sys.stderr)
        return 1
    print(f"ok: {page} rendered ({len(result['h2'])} sections, {result['images_loaded']}/{result['images']} images "
          f"loaded, no console errors, nothing from the network)"
          + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
