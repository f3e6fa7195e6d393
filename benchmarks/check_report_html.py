"""Open a report's index.html in real headless Chromium: does every image load? Screenshots at phone and
desktop width.

    python benchmarks/check_report_html.py runs/<name>          # or runs/<name>/report
    python benchmarks/check_report_html.py runs/<name> --out /tmp/shots

A copy of the page gets a small script that, once the page has loaded, counts the images whose
``complete`` and ``naturalWidth`` say they decoded, and writes the count into the DOM; Chromium's
``--dump-dom`` prints that DOM. Writes ``<out>/report_html_check.json`` and two PNG screenshots. Needs
a ``chromium`` (or ``chromium-browser``, ``google-chrome``) on PATH; the test suite does not.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "tune-rice-probe";
  out.textContent = JSON.stringify({images: imgs.length, loaded: imgs.length - bad.length,
    failed: bad.map(function (i) { return i.alt || i.src.slice(0, 60); }),
    scroll_width: document.documentElement.scrollWidth, viewport_width: window.innerWidth});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def run(browser: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=timeout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="runs/<name> or its report/ folder")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON and PNGs")
    args = p.parse_args()
    folder = Path(args.report)
    page = folder / "index.html" if (folder / "index.html").is_file() else folder / "report" / "index.html"
    if not page.is_file():
        print(f"error: no index.html in {folder} or {folder / 'report'}", file=sys.stderr)
        return 2
    browser = find_chromium()
    if browser is None:
        print("error: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    version = (
        run(browser, "--version").stdout.strip()
        or subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "browser": version,
        "page": str(page),
        "page_bytes": page.stat().st_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "index.html"  # same folder layout is not needed: every image is inlined
        probe.write_text(page.read_text().replace("</body>", PROBE + "\n</body>"))
        for width, name in ((390, "phone"), (1280, "desktop")):
            dom = run(browser, f"--window-size={width},900", "--dump-dom", probe.as_uri()).stdout
            m = re.search(r'<pre id="tune-rice-probe">(.*?)</pre>', dom, re.S)
            result[name] = json.loads(m.group(1).replace("&quot;", '"')) if m else {"error": "probe did not run"}
            shot = out / f"report_{name}.png"
            run(browser, f"--window-size={width},2600", f"--screenshot={shot}", page.resolve().as_uri())
            result[name]["screenshot"] = str(shot) if shot.is_file() else None
    (out / "report_html_check.json").write_text(json.dumps(result, indent=1))
    for name in ("phone", "desktop"):
        r = result[name]
        if "error" in r:
            print(f"{name}: {r['error']}")
            continue
        print(
            f"{name}: {r['loaded']} of {r['images']} images loaded; page {r['scroll_width']} px wide in a "
            f"{r['viewport_width']} px window; screenshot {r['screenshot']}"
        )
    ok = all("error" not in result[n] and result[n]["loaded"] == result[n]["images"] > 0 for n in ("phone", "desktop"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
