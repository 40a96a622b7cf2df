"""llama.cpp's ternary type TQ2_0, called through ``ggml-python`` (PyPI ``ggml-python``), as a
same-run baseline for our CPU ternary products. Optional: :func:`available` is False when the
package is missing (or lacks TQ2_0), and the benchmarks then leave the column out.

TQ2_0 stores 2 bits per weight in 256-weight blocks with an fp16 scale (66 bytes per 256
weights); ggml quantizes the fp32 activation to Q8_K inside ``mul_mat`` and runs its
AVX2/AVX-512 ``vec_dot_tq2_0_q8_K``. K must be a multiple of 256 (every MMfreeLM shape is).
"""

from __future__ import annotations

import ctypes

import numpy as np

try:  # pragma: no cover - depends on the environment
    import ggml

    _OK = hasattr(ggml, "GGML_TYPE_TQ2_0") and hasattr(ggml, "ggml_quantize_chunk")
except ImportError:  # pragma: no cover
    ggml = None
    _OK = False

__all__ = ["TQ2Matmul", "available"]


def available() -> bool:
    """True when ggml-python with TQ2_0 can be imported."""
    return _OK


class TQ2Matmul:
    """``y[M, N] = x[M, K] @ W[N, K]^T`` with W in TQ2_0, as ``copies`` identical weight copies
    (rotate over them to time the cold case), each with its own prebuilt graph."""

    def __init__(self, w: np.ndarray, x: np.ndarray, copies: int = 1, threads: int = 1) -> None:
        if not _OK:
            raise RuntimeError("ggml-python with GGML_TYPE_TQ2_0 is not installed")
        n, k = w.shape
        if k % 256:
            raise ValueError(f"TQ2_0 needs K % 256 == 0, got K={k}")
        m = x.shape[0]
        self.threads = threads
        wbytes = ggml.ggml_row_size(ggml.GGML_TYPE_TQ2_0, k) * n
        self.weight_bytes = wbytes
        overhead = ggml.ggml_tensor_overhead() * (4 * copies + 8) + ggml.ggml_graph_overhead() * copies
        # ggml pads every object (header + 16-byte alignment) and takes the graph's work buffer
        # from this pool too: slack per copy and a few MiB, or ggml aborts past the end.
        work = m * k * 4 + m * n * 4 * copies + copies * (64 << 10) + (8 << 20)
        size = wbytes * copies + overhead + work + m * k * 4
        self._params = ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=False)
        self.ctx = ggml.ggml_init(self._params)
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        first = ggml.ggml_new_tensor_2d(self.ctx, ggml.GGML_TYPE_TQ2_0, k, n)
        ggml.ggml_quantize_chunk(
            ggml.GGML_TYPE_TQ2_0, w32.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), first.contents.data, 0, n, k, None
        )
        self.x = ggml.ggml_new_tensor_2d(self.ctx, ggml.GGML_TYPE_F32, k, m)
        ctypes.memmove(self.x.contents.data, np.ascontiguousarray(x, dtype=np.float32).ctypes.data, m * k * 4)
        self.graphs = []
        self.outs = []
        for i in range(copies):
            wt = first
            if i > 0:
                wt = ggml.ggml_new_tensor_2d(self.ctx, ggml.GGML_TYPE_TQ2_0, k, n)
                ctypes.memmove(wt.contents.data, first.contents.data, wbytes)
            out = ggml.ggml_mul_mat(self.ctx, wt, self.x)
            gf = ggml.ggml_new_graph(self.ctx)
            ggml.ggml_build_forward_expand(gf, out)
            self.graphs.append(gf)
            self.outs.append(out)
        self._i = 0
        self.shape = (m, n)

    def __call__(self, copy: int | None = None) -> None:
        """One product on weight copy ``copy`` (default: the next one in rotation)."""
        if copy is None:
            self._i = (self._i + 1) % len(self.graphs)
            copy = self._i
        ggml.ggml_graph_compute_with_ctx(self.ctx, self.graphs[copy], self.threads)

    def result(self, copy: int = 0) -> np.ndarray:
        m, n = self.shape
        buf = (ctypes.c_float * (m * n)).from_address(ctypes.cast(self.outs[copy].contents.data, ctypes.c_void_p).value)
        return np.frombuffer(buf, dtype=np.float32).reshape(m, n).copy()

    def close(self) -> None:
        if self.ctx is not None:
            ggml.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()
