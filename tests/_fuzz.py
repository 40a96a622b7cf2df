"""Strategies, budgets and comparison rules shared by the fuzz tests (tests/test_fuzz_*.py).

Hypothesis profiles (pick with ``MMFREE_FUZZ_PROFILE``):

* ``ci`` (default): a fixed budget that fits CI (2 cores, about 2-3 minutes for all fuzz
  files), derandomized so every run draws the same cases; a failure prints the falsifying
  example and an ``@reproduce_failure`` blob that replays it.
* ``gpu``: five times the examples, fresh random cases each run, for the GPU machine
  (a failure prints the example and its blob; ``--hypothesis-seed=N`` replays a whole run).
* ``explore``: a hundred times the examples, random, for a long local run.

Every fuzz test runs on each device present (CPU, and CUDA where built and present).
At the end of the session tests/conftest.py prints how many cases each op ran per device.

Tensors are not drawn element by element (slow, and hypothesis shrinks them poorly): a case
draws its shape, dtype, layout, a value *kind* and a seed, and the tensor is generated from
those. Shrinking then works on what matters (shapes, kinds, layouts).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = {
    "deadline": None,  # timings on a shared 2-core machine are noise
    "database": None,  # no .hypothesis/ folder in clean checkouts
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("gpu", derandomize=False, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
PROFILE = os.environ.get("MMFREE_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "gpu", "explore"):
    raise ValueError(f"MMFREE_FUZZ_PROFILE must be ci, gpu or explore, got {PROFILE!r}")
settings.load_profile(PROFILE)

#: (op, device) -> cases run, printed at the end of the session (tests/conftest.py).
CASES: collections.Counter[tuple[str, str]] = collections.Counter()

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes no float op accepts: drawn now and then to test the error paths.
NON_FLOATS = (torch.int8, torch.int32, torch.uint8, torch.bool)

#: Profile multipliers of each test's base budget (see conftest.py).
_FACTOR = {"ci": 1, "gpu": 5, "explore": 100}[PROFILE]

#: cpu, and cuda marked `cuda` (skipped where this build or machine has no CUDA device).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def budget(n: int) -> settings:
    """``@budget(n)``: n examples under the ci profile, scaled for the others."""
    return settings(max_examples=n * _FACTOR)


def count(op: str, device: str) -> None:
    CASES[(op, device)] += 1


# ---- shapes and values ------------------------------------------------------------------

_SPECIAL_K = [1, 2, 3, 5, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 383, 1021, 2053, 2560, 4099]
_SPECIAL_ROWS = [0, 1, 2, 3, 5, 7, 13, 31, 64, 97]


def dim_k(max_k: int = 4099) -> st.SearchStrategy[int]:
    """A row length: small, primes, around the 128-weight block and SIMD widths, or wide."""
    return st.one_of(st.sampled_from([k for k in _SPECIAL_K if k <= max_k]), st.integers(1, max_k))


def dim_rows(max_rows: int = 97) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([r for r in _SPECIAL_ROWS if r <= max_rows]), st.integers(0, max_rows))


def lead_shape(rows: int) -> st.SearchStrategy[tuple[int, ...]]:
    """A leading shape holding ``rows`` rows: (), (rows,), or (a, b) with a * b == rows."""
    if rows == 1:
        return st.sampled_from([(), (1,), (1, 1)])
    divisors = [d for d in range(1, min(rows, 16) + 1) if rows % d == 0] or [1]
    return st.one_of(st.just((rows,)), st.sampled_from(divisors).map(lambda d: (d, rows // d)))


#: Value kinds: every kind but "normal" stresses an edge of the numerics.
KINDS = ["normal", "normal", "normal", "large", "tiny", "denormal", "zero_rows", "constant", "ties", "nan", "inf"]
FINITE_KINDS = [k for k in KINDS if k not in ("nan", "inf")]


def make_values(shape: Sequence[int], dtype: torch.dtype, kind: str, seed: int, device: str) -> torch.Tensor:
    """A tensor of ``shape`` in ``dtype`` whose values follow ``kind`` (see KINDS)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    fin = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    if kind == "large":
        x = x * min(fin.max / 64, 1e30)
    elif kind == "tiny":
        x = x * max(fin.tiny * 64, 1e-30)
    elif kind == "denormal":
        x = x * fin.tiny * 0.25  # subnormal in dtype (flushes to zero in coarser ones)
    elif kind == "zero_rows" and x.dim() >= 1 and x.numel():
        rows = x.reshape(-1, shape[-1])
        rows[torch.rand(rows.shape[0], generator=g) < 0.5] = 0.0
    elif kind == "constant":
        x = torch.full(shape, float(x.flatten()[0]) if x.numel() else 1.0, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-8, 9, shape, generator=g).double() * 0.5  # exact halves
    elif kind in ("nan", "inf") and x.numel():
        flat = x.view(-1)
        n_bad = 1 + int(torch.randint(0, max(1, flat.numel() // 16), (1,), generator=g))
        idx = torch.randint(0, flat.numel(), (n_bad,), generator=g)
        flat[idx] = float("nan") if kind == "nan" else float("inf") * (1 - 2 * (idx % 2)).double()
    return x.to(dtype).to(device)


# ---- layouts ----------------------------------------------------------------------------

#: contig: plain tensor; offset: contiguous view starting 1-3 elements past the allocation
#: (breaks 16-byte alignment); strided: a non-contiguous view (every other column).
LAYOUTS = ["contig", "contig", "offset", "offset", "strided"]


def place(t: torch.Tensor, layout: str, shift: int = 1) -> torch.Tensor:
    """The values of ``t`` in the given memory layout (same shape, same values)."""
    if layout == "offset":
        buf = torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)
        out = buf[shift:].view(t.shape)
        out.copy_(t)
        return out
    if layout == "strided" and t.dim() >= 1 and t.numel() > 0:
        buf = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        out = buf[..., ::2]
        out.copy_(t)
        return out
    return t


def is_strided(t: torch.Tensor | None) -> bool:
    return t is not None and not t.is_contiguous()


def expect_error(fn: Callable[[], object], names: Sequence[str]) -> None:
    """fn must raise RuntimeError/ValueError whose message names one of ``names``."""
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        assert any(f"'{n}'" in msg for n in names), f"error names none of {names}: {msg}"
        return
    raise AssertionError(f"expected an error naming one of {names}")


# ---- comparison rules (STYLE.md) --------------------------------------------------------


def assert_same_nonfinite(out: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN where expected has NaN, the same infinities where it has them."""
    o, e = out.cpu().double(), expected.cpu().double()
    assert torch.equal(o.isnan(), e.isnan()), f"NaN positions differ: {int((o.isnan() != e.isnan()).sum())}"
    inf = e.isinf()
    assert torch.equal(o.isinf(), inf), f"inf positions differ: {int((o.isinf() != inf).sum())}"
    assert torch.equal(o[inf], e[inf])


def assert_within_torch_error(
    out: torch.Tensor,
    baseline: torch.Tensor,
    truth: torch.Tensor,
    mult: float = 4.0,
    ulps: float = 2.0,
    floor_ulps: float = 0.0,
    eps_dtype: torch.dtype | None = None,
    floor_scale: float = 1.0,
) -> None:
    """|out - truth| <= mult * max|baseline - truth| + ulps rounding of each element to out's dtype.

    ``baseline`` is torch (the reference) in the same low precision, ``truth`` float64.
    Non-finite entries of ``truth`` must be matched exactly (NaN for NaN, same infinities).
    ``floor_ulps``: an absolute floor of that many ulps of max(1, max|truth|), for results
    formed by cancellation (gradients), whose small elements carry the error of large terms.
    ``eps_dtype``: the precision the ulps are counted in, when the op computes in a coarser
    dtype than it returns (default: out's dtype). ``floor_scale``: the size of the terms
    that cancel, when it exceeds max(1, max|truth|) (the floor is counted in ulps of it).
    """
    o, b, t = out.cpu().double(), baseline.cpu().double(), truth.cpu().double()
    assert o.shape == t.shape, f"shape {tuple(o.shape)} vs {tuple(t.shape)}"
    # The truth as out's dtype can hold it: a finite value past its range is an inf there.
    assert_same_nonfinite(o, t.to(out.dtype).double())
    fin = t.to(out.dtype).isfinite()
    if not bool(fin.any()):
        return
    o, b, t = o[fin], b[fin], t[fin]
    base_err = (b - t).abs()
    base_err = base_err[base_err.isfinite()].max().item() if bool(base_err.isfinite().any()) else 0.0
    eps = torch.finfo(eps_dtype or out.dtype).eps
    tiny = torch.finfo(eps_dtype or out.dtype).tiny
    floor = floor_ulps * eps * max(1.0, floor_scale, t.abs().max().item())
    bound = mult * base_err + ulps * eps * t.abs() + tiny + floor
    err = (o - t).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} elements off: worst error {float(err.max()):.3e} vs torch's {base_err:.3e} "
        f"(|truth| max {float(t.abs().max()):.3e})"
    )


def near_tie(v: torch.Tensor, tol: float) -> torch.Tensor:
    """Where the float64 value v lies within tol of a rounding tie (k + 0.5)."""
    frac = v.abs() - v.abs().floor()
    return (frac - 0.5).abs() <= tol


def assert_codes_equal_off_ties(q: torch.Tensor, q_ref: torch.Tensor, v_truth: torch.Tensor, tol: float) -> None:
    """int8 codes equal the reference's exactly, except by one at a rounding tie of the
    float64 pre-rounding value (the fp32 statistic may differ in its last ulp)."""
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape, f"{q.dtype}{tuple(q.shape)} vs {tuple(q_ref.shape)}"
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    if not bool((diff != 0).any()):
        return
    assert int(diff.max()) <= 1, f"codes differ by {int(diff.max())}"
    ties = near_tie(v_truth.cpu().double(), tol)
    off = (diff != 0) & ~ties
    assert not bool(off.any()), f"{int(off.sum())} codes differ away from a rounding tie"
