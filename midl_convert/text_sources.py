"""English sentences from text every Python installation carries, for calibration and distillation.

Three sources, none of which judging reads (it reads Bible verses): Python's help topics
(``pydoc_data.topics``), the docstrings of the standard library (read with ``ast``, nothing
imported) and the descriptions of the installed packages (``importlib.metadata``). One narrow source
does not carry over to other text; mixing them widens what distillation sees.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from importlib import metadata

_SPLIT = re.compile(r"(?<=[.!?])\s+")
_CODE = re.compile(r"[{}<>=*]{2}|\*\*\*|>>>|\.\.\. |`{3}")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


def sentences(text: str) -> list[str]:
    """The prose sentences of ``text``: 40 to 300 characters, starting with a capital, no code."""
    out = []
    for sent in _SPLIT.split(re.sub(r"\s+", " ", text)):
        if 40 <= len(sent) <= 300 and sent[0].isupper() and not _CODE.search(sent):
            out.append(sent)
    return out


def text_sentences() -> list[str]:
    """English sentences from the help topics that ship with Python (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics  # 0.75 MB of help text, loaded only when asked for

    out = []
    for name in sorted(topics):
        for sent in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", topics[name])):
            if 40 <= len(sent) <= 300 and sent[0].isupper() and not re.search(r"[{}<>=*]{2}|\*\*\*", sent):
                out.append(sent)
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Sentences of the standard library's module, class and function docstrings (parsed, not imported;
    tests and tools left out), in file order."""
    lib = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        out += sentences(doc)
    return tuple(dict.fromkeys(out))


def package_descriptions() -> list[str]:
    """Sentences of the installed packages' descriptions (their README as published), by package name."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name and name not in found:
            found[name] = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    return list(dict.fromkeys(s for name in sorted(found) for s in sentences(found[name])))


def mixed() -> list[str]:
    """Every source above, deduplicated: 14,340 sentences on Python 3.11 with the ``demo`` extra installed
    (1,607 of them help topics)."""
    return list(dict.fromkeys([*text_sentences(), *stdlib_docstrings(), *package_descriptions()]))
