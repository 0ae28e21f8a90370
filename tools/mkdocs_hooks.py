"""MkDocs hooks of the documentation site (mkdocs.yml, `make docs`).

The page of measured tables is benchmarks/README.md itself, read at every build (so it never
goes stale), with its links rewritten for the site: a link into docs/ becomes a link to that
page, a link to another file of the repository becomes its path in the repository.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "README.md"
PAGE = "benchmark-tables.md"
MARKER = "<!-- benchmarks/README.md -->"
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def _rewrite(match: re.Match) -> str:
    text, target = match.group(1), match.group(2)
    if re.match(r"[a-z]+:|#", target):
        return match.group(0)  # a URL, or an anchor of the page itself
    path, _, anchor = target.partition("#")
    resolved = (SOURCE.parent / path).resolve()
    try:
        page = resolved.relative_to(ROOT / "docs").as_posix()
    except ValueError:
        return f"{text} (`{resolved.relative_to(ROOT).as_posix()}` in the repository)"
    return f"[{text}]({page}{'#' + anchor if anchor else ''})"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    body = SOURCE.read_text().split("\n", 1)[1]  # less its title: the page has its own
    return markdown.replace(MARKER, LINK.sub(_rewrite, body))
