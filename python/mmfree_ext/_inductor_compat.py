"""A bounded Inductor fallback log line, so ``torch.compile`` of a deep model finishes on torch 2.11.

Inductor lowers each of our custom ops through its implicit fallback, and before creating it
logs ``"Creating implicit fallback for: ..."`` at INFO level with
``OperatorIssue.operator_str(target, args, kwargs)``. Older torch releases build that string
eagerly, whatever the log level (torch 2.14 wraps it in ``LazyString``), and it calls
``__str__`` on every input IR node, which prints its inputs in turn: the graph's DAG unrolled as
a tree. The residual stream of a 24-layer model trained through our ops makes that tree
exponential in depth. On the H200 with torch 2.11, the compile of the 370M training step sat in
that ``ir.py __str__`` recursion for minutes and never finished; vLLM hit the same hang with its
custom ops (vllm-project/vllm#42129, #43111).

:func:`install` replaces ``operator_str`` with a version that names each IR argument by its
type and buffer name instead of recursing. That changes the text of this log line and of
Inductor's ``MissingOperatorWith(out)Decomp`` / ``LoweringException`` messages, which format
their operator the same way, for every op in the process (also on torch versions that already
log lazily: their messages get shorter). The patch lands when ``torch._inductor.exc`` is first
imported (a meta-path hook), so importing mmfree_ext does not import Inductor.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import textwrap
from typing import Any

_MODULE = "torch._inductor.exc"
_MAX_ITEMS = 8
_MAX_CHARS = 200


def _prints_small(arg: Any) -> bool:
    """dtypes, devices, symbolic sizes (SymInt, sympy expressions): short, informative str()."""
    import torch

    if isinstance(arg, (torch.dtype, torch.device, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return type(arg).__module__.split(".")[0] == "sympy"


def _short(arg: Any, depth: int = 0) -> str:
    """A bounded description: plain values as they print, sequences up to _MAX_ITEMS items,
    anything else (IR nodes, tensors) by type and, where it has one, its buffer name."""
    if arg is None or isinstance(arg, (bool, int, float, str)) or _prints_small(arg):
        return str(arg)[:_MAX_CHARS]
    if isinstance(arg, (list, tuple)) and depth < 2:
        items = [_short(a, depth + 1) for a in arg[:_MAX_ITEMS]]
        if len(arg) > _MAX_ITEMS:
            items.append(f"... {len(arg) - _MAX_ITEMS} more")
        return ("[{}]" if isinstance(arg, list) else "({})").format(", ".join(items))
    name = None
    get_name = getattr(arg, "get_name", None)
    if callable(get_name):
        try:
            name = get_name()
        except Exception:  # IR nodes without a buffer (views, boxes) raise here
            name = None
    return f"<{type(arg).__name__}{' ' + str(name) if name else ''}>"


def bounded_operator_str(target: Any, args: Any, kwargs: Any) -> str:
    """Inductor's ``OperatorIssue.operator_str`` layout, linear in the number of arguments."""
    lines = [f"target: {target}"] + [f"args[{i}]: {_short(a)}" for i, a in enumerate(args)]
    if kwargs:
        lines.append("kwargs: {" + ", ".join(f"{k!r}: {_short(v)}" for k, v in kwargs.items()) + "}")
    return textwrap.indent("\n".join(lines), "  ")


def _patch(module: Any) -> None:
    issue = getattr(module, "OperatorIssue", None)
    if issue is not None:
        issue.operator_str = staticmethod(bounded_operator_str)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds torch._inductor.exc like the path finder does and patches it once it has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _patch(module)
            if self in sys.meta_path:  # done once the module has run (a failed import retries)
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module  # this module's loader instance only
        return spec


def install() -> None:
    """Patch now if Inductor is loaded, else when it is."""
    if _MODULE in sys.modules:
        _patch(sys.modules[_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
