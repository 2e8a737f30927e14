"""Regenerate sample/text/docs.jsonl from the documentation and source that ship with CPython.

Run once by the team; the output is committed so the corpus does not change with the Python version.
Prose comes from `pydoc_data.topics` (the language reference as shown by `help()`), code from
functions of small, readable standard-library modules. Both are under the PSF licence.
"""

import ast
import inspect
import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

CODE_MODULES = [
    "textwrap",
    "bisect",
    "heapq",
    "colorsys",
    "shlex",
    "fractions",
    "statistics",
    "difflib",
    "glob",
    "fnmatch",
    "calendar",
    "base64",
    "functools",
    "copy",
]
MAX_CHARS = 3000
N_PROSE, N_CODE = 130, 70


def prose_docs() -> list[dict]:
    """Split each help topic at blank lines into chunks of at most MAX_CHARS characters."""
    docs = []
    for topic in sorted(topics):
        chunk: list[str] = []
        part = 0
        for para in topics[topic].split("\n\n"):
            if chunk and sum(len(p) + 2 for p in chunk) + len(para) > MAX_CHARS:
                docs.append((topic, part, "\n\n".join(chunk)))
                chunk, part = [], part + 1
            chunk.append(para)
        if chunk:
            docs.append((topic, part, "\n\n".join(chunk)))
    docs = [d for d in docs if len(d[2]) >= 300]
    step = max(1, len(docs) // N_PROSE)
    return [
        {
            "id": f"pydoc-{t}-{p}",
            "text": text.strip() + "\n",
            "source": f"CPython {sys.version.split()[0]} pydoc_data.topics[{t!r}]",
            "license": "PSF-2.0",
            "kind": "prose",
        }
        for t, p, text in docs[::step][:N_PROSE]
    ]


def code_docs() -> list[dict]:
    """Top-level functions and classes, with their docstrings and comments, as they appear in the source."""
    docs = []
    for name in CODE_MODULES:
        module = __import__(name)
        source = inspect.getsource(module)
        lines = source.splitlines(keepends=True)
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                text = "".join(lines[node.lineno - 1 - len(node.decorator_list) : node.end_lineno])
                if 200 <= len(text) <= 4000:
                    docs.append(
                        {
                            "id": f"code-{name}-{node.name}",
                            "text": text,
                            "source": f"CPython {sys.version.split()[0]} Lib/{name}.py",
                            "license": "PSF-2.0",
                            "kind": "code",
                        }
                    )
    step = max(1, len(docs) // N_CODE)
    return docs[::step][:N_CODE]


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "text" / "docs.jsonl"
    docs = prose_docs() + code_docs()
    with out.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents to {out}")
