"""``report/index.html``: the report's own markdown rendered to one self-contained page.

Every section of ``report.md`` appears, whoever adds it, because the page is rendered from that file
(Python-Markdown, with tables); each image it references is inlined as a ``data:`` URI, so the page is
one file to mail or open on a phone. The layout is one column that fits a narrow screen: images scale
to the width, wide tables scroll sideways inside their own box.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

PAGE = "index.html"
_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")', re.IGNORECASE)
CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45; color: #1d1d1f;
       max-width: 62rem; margin: 0 auto; padding: 0.75rem 1rem 3rem; }
h1 { font-size: 1.5rem; overflow-wrap: anywhere; } h2 { font-size: 1.25rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; } h3 { font-size: 1.05rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
code { font-size: 0.9em; background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
li { margin: 0.2rem 0; }
"""


def image_sources(page: str) -> list[str]:
    """The ``src`` of every ``<img>`` in an HTML page, in order."""
    return [m.group(2) for m in _IMG_SRC.finditer(page)]


def _inline(match: re.Match, folder: Path) -> str:
    src = html.unescape(match.group(2))
    path = folder / src
    mime = _MIME.get(path.suffix.lower())
    if src.startswith(("data:", "http://", "https://")) or mime is None or not path.is_file():
        if not src.startswith("data:"):
            log.warning("%s: image %s not inlined (not a local image file beside the report)", PAGE, src)
        return match.group(0)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"{match.group(1)}data:{mime};base64,{data}{match.group(3)}"


def render_html(markdown_text: str, folder: Path) -> str:
    """The page for ``markdown_text``; images are looked up relative to ``folder`` and inlined."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"], output_format="html")
    body = body.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    body = _IMG_SRC.sub(lambda m: _inline(m, folder), body)
    first = next((ln[2:].strip() for ln in markdown_text.splitlines() if ln.startswith("# ")), "report")
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(first)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_html(report_md: Path) -> Path:
    """Write ``index.html`` beside ``report_md``; returns its path."""
    page = report_md.parent / PAGE
    tmp = page.with_name(f".{PAGE}.tmp")
    tmp.write_text(render_html(report_md.read_text(), report_md.parent), encoding="utf-8")
    tmp.replace(page)
    return page
