"""The demo's training text: docstrings of a fixed list of standard-library modules.

Collected with :mod:`inspect` (module docstring, then the docstrings of its public functions
and classes and their methods, in sorted order), so the text is the same on every run with
the same Python and needs no download.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

__all__ = ["STDLIB_MODULES", "stdlib_docstrings"]

STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "secrets", "shlex", "shutil", "socket", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "types", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)  # fmt: skip


def _member_docs(prefix: str, obj: object, depth: int) -> list[str]:
    out = []
    for name in sorted(vars(obj)) if hasattr(obj, "__dict__") else []:
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        if not (inspect.isfunction(member) or inspect.isclass(member) or inspect.isbuiltin(member)):
            continue
        doc = inspect.getdoc(member)
        if doc and len(doc) > 20:
            out.append(f"{prefix}.{name}\n{doc}\n")
        if depth > 0 and inspect.isclass(member):
            out.extend(_member_docs(f"{prefix}.{name}", member, depth - 1))
    return out


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The concatenated docstrings (modules that fail to import are skipped)."""
    with warnings.catch_warnings():  # some members (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        return _collect(modules)


def _collect(modules: tuple[str, ...]) -> str:
    parts: list[str] = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(f"{mod_name}\n{doc}\n")
        parts.extend(_member_docs(mod_name, mod, depth=1))
    return "\n".join(parts)
