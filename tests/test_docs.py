"""The docs check (`make docs`) passes: links resolve, code parses, names documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHECK = Path(__file__).parent.parent / "docs" / "check.py"


def test_docs_are_consistent() -> None:
    spec = importlib.util.spec_from_file_location("docs_check", CHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.problems() == []
