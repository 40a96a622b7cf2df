"""``MMfreeCache``: the recurrent state of MMfreeLM as a transformers ``Cache``.

MMfreeLM has no keys or values: a sequence's whole past is one fp32 vector of ``h`` floats per
layer (the MLGRU hidden state), held here as one tensor ``[L, B, h]``. The cache knows how many
tokens it has absorbed (``get_seq_length``), so ``prepare_inputs_for_generation`` feeds only the
new ones; beam search reorders it along the batch dimension (``reorder_cache``). It cannot be
cropped (a recurrent state cannot forget tokens), so assisted decoding is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

__all__ = ["MMfreeCache"]


class MMfreeCache(Cache):
    """Per-layer MLGRU state ``[L, B, h]`` (fp32) and the number of tokens it holds.

    ``state`` is None until the first forward (prefill) fills it. The model calls
    :meth:`update_state` after each forward; generation calls :meth:`reorder_cache` (beam
    search), :meth:`batch_repeat_interleave` / :meth:`batch_select_indices` (expansion,
    contrastive search) and :meth:`get_seq_length`.
    """

    def __init__(self, num_layers: int, state: Tensor | None = None, seen_tokens: int = 0) -> None:
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers versions whose Cache takes no layer list
            super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.state: Tensor | None = None
        self.seen_tokens = 0
        if state is not None:
            self.update_state(state, seen_tokens)

    # ------------------------------------------------------------------------------------
    def update_state(self, state: Tensor, num_new_tokens: int) -> Tensor:
        """Replace the state by ``state [L, B, h]`` after a forward over ``num_new_tokens`` tokens."""
        if state.dim() != 3 or state.shape[0] != self.num_layers:
            raise ValueError(f"state must be [L={self.num_layers}, B, h], got {tuple(state.shape)}")
        self.state = state
        self.seen_tokens += int(num_new_tokens)
        return state

    def get_seq_length(self, layer_idx: int | None = 0, *args: Any, **kwargs: Any) -> int:
        """Tokens absorbed so far (the same for every layer)."""
        return self.seen_tokens

    def get_max_length(self, *args: Any, **kwargs: Any) -> int:
        return -1  # no sequence dimension: any length fits

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        return -1

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return 0, 0  # no attention over past positions

    def __len__(self) -> int:
        return self.num_layers if self.state is not None else 0

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state.shape)
        return f"MMfreeCache(num_layers={self.num_layers}, state={shape}, seen_tokens={self.seen_tokens})"

    # Properties transformers' generate() reads ------------------------------------------
    @property
    def is_compileable(self) -> bool:  # the model replays its own CUDA graph instead
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_linear(self) -> list[bool]:
        return [True] * self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else int(self.state.shape[1])

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    # Batch manipulation --------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` of the new state is row ``beam_idx[b]`` of the old one."""
        if self.state is not None:
            self.state = self.state.index_select(1, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=1)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state = self.state[:, indices.to(self.state.device)]

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        if max_length < 0 or max_length < self.seen_tokens:
            raise RuntimeError(
                "MMfreeCache cannot be cropped: a recurrent state cannot drop tokens it has absorbed "
                "(assisted / speculative decoding is not supported for MMfreeLM)"
            )

    def early_initialization(self, *args: Any, **kwargs: Any) -> None:
        pass  # the state is created by the first forward

    def offload(self, *args: Any, **kwargs: Any) -> None:
        pass

    def prefetch(self, *args: Any, **kwargs: Any) -> None:
        pass
