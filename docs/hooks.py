"""MkDocs hooks for the aiosync site (listed in mkdocs.yml).

- ``examples.md`` is generated from ``examples/*.py``: for each example, the first
  line of its docstring, then its source (which starts with the whole docstring).
  The examples stay the single source of truth (the test suite runs them).
- A page's link to ``../examples/NAME.py`` (the source file, which is what GitHub
  shows) points at that example's section of ``examples.md`` in the site. Every other
  link is left alone, so a broken one still fails the strict build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE_LINK = re.compile(r"\]\(\.\./examples/(\w+)\.py\)")
FIRST = "prefork_server"  # the one `make demo` runs


def examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.py"), key=lambda p: (p.stem != FIRST, p.stem))


def examples_page() -> str:
    """The examples page: each example's summary line, then its whole source.

    The rest of the docstring (what the example shows, how to run it) is the top of the
    source itself, so it is not repeated above it. The page hides the table of contents
    (it lists the examples at the top instead) so that the sources, written to 100
    columns, fit a 1280 px screen without scrolling sideways.
    """
    paths = examples()
    parts = [
        "---\nhide:\n  - toc\n---\n",
        "# Examples\n",
        "Runnable programs, each run end to end by the test suite on both loops. "
        "They live in the repository's `examples/` folder; run them with "
        "`.venv/bin/python examples/NAME.py --help`.\n",
        "\n".join(f"- [`{path.name}`](#{path.stem})" for path in paths) + "\n",
    ]
    for path in paths:
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        summary = doc.partition("\n\n")[0]
        parts.append(f"## {path.name} {{#{path.stem}}}\n")
        parts.append(summary.replace("\n", " ") + "\n")
        parts.append(f'```python title="examples/{path.name}"\n{source}```\n')
    return "\n".join(parts)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, "examples.md", content=examples_page()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Any) -> str:
    return EXAMPLE_LINK.sub(lambda m: f"](examples.md#{m.group(1)})", markdown)
