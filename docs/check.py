"""`make docs`: check the documentation against the code.

- every relative link in README.md and docs/*.md points at a file that exists, and
  every ``#anchor`` into a Markdown file names one of its headings;
- every ```python block parses (top-level ``await`` allowed);
- every public name in ``aiosync.__all__`` is documented somewhere in docs/ (not
  counting the generated API reference, docs/api.md).

`make docs` then builds the site with ``mkdocs build --strict`` (see mkdocs.yml).

Exits 1 and lists the problems if there are any.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def check_links(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # external: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.relative_to(ROOT)}: broken link {target!r}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.relative_to(ROOT)}: no heading for {target!r}")
    return problems


def check_code(page: Path) -> list[str]:
    problems = []
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    for n, block in enumerate(FENCE.findall(page.read_text()), 1):
        try:
            compile(block, f"{page.name}[{n}]", "exec", flags=flags)
        except SyntaxError as exc:
            problems.append(f"{page.relative_to(ROOT)}: python block {n} does not parse: {exc}")
    return problems


def check_names() -> list[str]:
    import aiosync

    # The generated API reference names everything; the prose must too.
    prose = [p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md"]
    text = "\n".join(p.read_text() for p in prose)
    return [
        f"docs/: public name aiosync.{name} is not documented"
        for name in aiosync.__all__
        if not re.search(rf"\b{re.escape(name)}\b", text)
    ]


def problems() -> list[str]:
    found = check_names()
    for page in pages():
        found += check_links(page) + check_code(page)
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    print(f"docs: {len(pages())} pages checked, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
