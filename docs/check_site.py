"""Open pages of the built site in headless Chromium, offline, and check what a reader sees.

    python docs/check_site.py docs/_build/html zoo/m2.html tutorials/vae.html tutorials/m2.html

For each page: MathJax is loaded from the site itself (not a CDN), every equation is typeset (no
element of class ``math`` left as raw TeX such as ``\\[p(y) = ...\\]``) and every image has loaded.
Chromium runs with every host name unresolvable, so a page that needs the network fails here as it
would for a reader without one. The check is a copy of the page beside it (``<page>.check.html``,
removed afterwards) with a script that waits for MathJax's typesetting and writes what it found into
the document, which ``--dump-dom`` prints. Exit 0 when every page passes, 1 otherwise (a line per
failure), 2 when Chromium is missing or a page does not exist.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

#: appended before </body>: waits for the page's load and MathJax's first typesetting, then reports
PROBE = """<script>
window.addEventListener("load", () => {
  const mj = window.MathJax;
  const ready = mj && mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve();
  ready.then(() => {
    const script = [...document.scripts].find((s) => /mathjax/i.test(s.src));
    const report = {
      mathjax_src: script ? script.src : null,
      mathjax_version: mj && mj.version ? mj.version : null,
      equations: document.querySelectorAll(".math").length,
      typeset: document.querySelectorAll(".math mjx-container").length,
      raw: [...document.querySelectorAll(".math")]
        .filter((e) => !e.querySelector("mjx-container"))
        .map((e) => e.textContent.trim().slice(0, 80)),
      images: [...document.images].map((i) => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]),
    };
    const out = document.createElement("pre");
    out.id = "pyrossl-site-check";
    out.textContent = JSON.stringify(report);
    document.body.appendChild(out);
  });
});
</script>"""

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def inspect_page(browser: str, page: Path, timeout: float = 90.0) -> dict:
    """What headless Chromium found on ``page`` (the probe's report)."""
    probe = page.with_name(page.stem + ".check.html")
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", PROBE + "\n</body>", 1), encoding="utf-8")
    try:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # root in CI containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: a CDN cannot be reached
                "--virtual-time-budget=20000",  # let scripts, fonts and timers run before the DOM is dumped
                "--dump-dom",
                probe.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="pyrossl-site-check">(.*?)</pre>', done.stdout, re.S)
    if not found:
        return {"error": f"the probe did not report (chromium exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(html.unescape(found.group(1)))


def problems(report: dict) -> list[str]:
    """What is wrong on a page, one line each; [] when it renders."""
    if "error" in report:
        return [report["error"]]
    out = []
    src = report["mathjax_src"]
    if report["equations"]:
        if not src or not src.startswith("file:"):
            out.append(f"MathJax is not served by the site: {src}")
        if report["raw"]:
            left, first = len(report["raw"]), report["raw"][0]
            out.append(f"{left} of {report['equations']} equations left as raw TeX, e.g. {first!r}")
    out += [f"image did not load: {name}" for name, loaded in report["images"] if not loaded]
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python docs/check_site.py SITE_DIR PAGE [PAGE ...]", file=sys.stderr)
        return 2
    browser = chromium()
    if browser is None:
        print(f"check_site: no Chromium ({', '.join(CHROMIUM_NAMES)}) on PATH", file=sys.stderr)
        return 2
    site, failed = Path(args[0]), 0
    for name in args[1:]:
        page = site / name
        if not page.is_file():
            print(f"check_site: {page} does not exist", file=sys.stderr)
            return 2
        report = inspect_page(browser, page)
        found = problems(report)
        failed += bool(found)
        summary = (
            f"{report.get('typeset', 0)}/{report.get('equations', 0)} equations typeset, "
            f"{sum(ok for _, ok in report.get('images', []))}/{len(report.get('images', []))} images"
        )
        print(f"{'FAIL' if found else 'ok  '} {name}: {summary}")
        for line in found:
            print(f"     {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
