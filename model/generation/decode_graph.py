"""`decode_step` captured in a CUDA graph: one replay per generated token instead of hundreds of kernel launches.

On a GPU a small model's decode step is bound by launching its kernels from Python (about 25 per layer), not by
the kernels themselves. A CUDA graph records them once and replays them with one call. Graphs need fixed shapes and
addresses, so the captured step reads everything from buffers that live for the whole generation: the new column
(token, position and the column index, written by one host-to-device copy per step), the validity grid, and the
KV cache; it writes the cache column through a device index and attends over every cache column with the validity
mask (plus the new column itself), which hides the columns not yet written. The Generator keeps these buffers and
the graph for its next generation of the same shape (batch rows, length, weights), so capturing (which synchronises
the device and empties PyTorch's allocator cache) happens once, not per call.
"""

from __future__ import annotations

import torch

from model.generation.decode_step import DecodeWeights, decode_step
from model.lm.transformer import KVCache


def column_mask(valid: torch.Tensor, col: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the valid columns [B, L] plus column `col` (a one-element tensor) itself for every row, as
    `_attention_mask` gives a decoding step (a row always attends its own new token)."""
    return valid | (columns == col)


def static_decode_step(
    weights: DecodeWeights, column: torch.Tensor, valid: torch.Tensor, cache: KVCache, columns: torch.Tensor
) -> torch.Tensor:
    """`decode_step` for the new column described by `column` [4, B] (tokens, validity, positions, the column
    index in every entry), with fixed shapes: the function a CUDA graph captures, and runs eagerly on any device."""
    col = column[3, :1]
    return decode_step(weights, column[0], column[2], cache, col, column_mask(valid, col, columns))


class GraphedDecode:
    """`static_decode_step` over one generation's buffers; `()` runs it and returns the hidden states [B, dim] (on
    CUDA the same tensor every call: read it before the next one).

    On a CUDA device the step is captured once in a CUDA graph and replayed. Capture runs the step once for real (on
    a side stream: CUDA graphs need a warm-up), so build it when `column` already holds the first column to decode:
    that run writes the same cache column the first replay does. Elsewhere the step runs eagerly (the same
    computation, which the tests check against `decode_step`).
    """

    def __init__(self, weights: DecodeWeights, column: torch.Tensor, valid: torch.Tensor, cache: KVCache):
        columns = torch.arange(valid.shape[1], device=valid.device)

        def step() -> torch.Tensor:
            return static_decode_step(weights, column, valid, cache, columns)

        self.step, self.graph, self.device = step, None, valid.device
        if valid.device.type != "cuda":
            return
        # The model's device made current: capture records the current device's stream (cuda:1 would record nothing).
        with torch.cuda.device(valid.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS handles, workspaces) outside capture
                step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.hidden = step()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.hidden
