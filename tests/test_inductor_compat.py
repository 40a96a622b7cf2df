"""The bounded Inductor fallback log (mmfree_ext._inductor_compat): installed when Inductor loads,
linear in the arguments where torch's own version unrolls the IR DAG, same text for plain args."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mmfree_ext import _inductor_compat


class _Node:
    """An IR-like node whose __str__ prints both parents, as Inductor's IR nodes print their
    inputs: a chain of depth d prints 2^d leaves."""

    def __init__(self, name: str, parents: tuple[_Node, ...] = ()) -> None:
        self.name, self.parents = name, parents

    def get_name(self) -> str:
        return self.name

    def __str__(self) -> str:
        return f"Node({self.name}, " + ", ".join(str(p) for p in self.parents) + ")"


def _deep_dag(depth: int) -> _Node:
    node = _Node("buf0")
    for i in range(1, depth + 1):
        node = _Node(f"buf{i}", (node, node))
    return node


_CHECK = (
    "from torch._inductor.exc import OperatorIssue, MissingOperatorWithoutDecomp\n"
    "from mmfree_ext._inductor_compat import bounded_operator_str as f\n"
    "assert OperatorIssue.operator_str is f and MissingOperatorWithoutDecomp.operator_str is f\n"
)


@pytest.mark.parametrize(
    "prelude",
    [
        # mmfree_ext first: it must not import Inductor, and Inductor's import gets the patch
        "import sys, mmfree_ext\nassert 'torch._inductor.exc' not in sys.modules\n",
        # Inductor first: mmfree_ext's import patches the loaded module
        "import torch._inductor.exc\nimport mmfree_ext\n",
    ],
    ids=["mmfree_first", "inductor_first"],
)
def test_installed_in_either_import_order(prelude: str) -> None:
    """In a fresh interpreter, whichever of the two is imported first."""
    subprocess.run([sys.executable, "-c", prelude + _CHECK], check=True, timeout=240)


def test_deep_dag_is_linear() -> None:
    node = _deep_dag(60)  # str(node) would print 2^60 leaves
    t0 = time.perf_counter()
    text = _inductor_compat.bounded_operator_str("mmfree::rms_norm_quant.default", [node, [node] * 20, 1e-6], {})
    assert time.perf_counter() - t0 < 0.1
    assert "<_Node buf60>" in text and "12 more" in text and "1e-06" in text
    assert len(text) < 1000


def test_plain_arguments_print_as_torch_prints_them() -> None:
    """Scalars, lists, dtypes and devices keep torch's text; the patched method is the one
    Inductor's errors call."""
    import torch
    from torch._inductor.exc import MissingOperatorWithoutDecomp

    args = [3, None, [1, 2], torch.bfloat16, torch.device("cpu")]
    want = (
        "  target: op\n  args[0]: 3\n  args[1]: None\n  args[2]: [1, 2]\n  args[3]: torch.bfloat16\n"
        "  args[4]: cpu\n  kwargs: {'eps': 1e-06}"
    )
    assert MissingOperatorWithoutDecomp.operator_str("op", args, {"eps": 1e-6}) == want
