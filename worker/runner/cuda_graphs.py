"""Decode steps as captured CUDA graphs, one per batch-size bucket.

A decode step of the 8B shape is ~1,000 kernel launches; launched from Python they take
longer than the GPU needs to run them at small batches. Captured once at start-up, a
step is one graph launch. Each bucket's graph reads the runner's persistent input buffers
(token ids, positions, slot mapping, context lengths, block tables: `StepInputs`) and
writes the final hidden states into its own static output; a batch runs in the smallest
bucket that holds it, its extra rows padding (slot -1: nothing stored; length 0:
attention writes zeros), their outputs dropped.

Buckets: 1, 2, 4, then every 8 up to max_num_seqs. All graphs share one memory pool and
are captured largest first, so the pool is sized by the largest and reused by the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from lmfleet.worker.model.attention.base import AttentionBackend, CommonAttentionMetadata
from lmfleet.worker.runner.step_inputs import StepInputs

logger = logging.getLogger(__name__)

# (input_ids, positions, backend metadata) -> hidden (B, H)
Forward = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def graph_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    buckets += list(range(8, max_batch, 8))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    def __init__(self, forward: Forward, backend: AttentionBackend, inputs: StepInputs,
                 max_batch: int, max_seq_len: int) -> None:
        self.forward = forward
        self.backend = backend
        self.inputs = inputs
        self.max_batch = min(max_batch, inputs.max_num_reqs, inputs.max_num_tokens)
        self.max_seq_len = max_seq_len
        self.buckets = graph_buckets(self.max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _padding_metadata(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Static views of `batch` padding rows, and the backend's graph metadata."""
        view = self.inputs.device_view
        view("slot_mapping", batch).fill_(-1)
        view("seq_lens", batch).zero_()
        view("input_ids", batch).zero_()
        view("positions", batch).zero_()
        view("block_tables", batch).zero_()
        view("query_start_loc", batch + 1).copy_(torch.arange(batch + 1, dtype=torch.int32))
        common = CommonAttentionMetadata(
            num_decodes=batch, num_prefills=0, num_tokens=batch,
            block_size=self.inputs.block_size, max_query_len=1, max_seq_len=self.max_seq_len,
            query_lens=np.ones(batch, np.int64), seq_lens_host=np.zeros(batch, np.int64),
            block_tables_host=np.zeros((batch, self.inputs.width), np.int32),
            slot_mapping=view("slot_mapping", batch),
            query_start_loc=view("query_start_loc", batch + 1), seq_lens=view("seq_lens", batch),
            block_tables=view("block_tables", batch))
        metadata = self.backend.graph_metadata(common, self.max_seq_len)
        return view("input_ids", batch), view("positions", batch), metadata

    @torch.inference_mode()
    def capture(self, show_progress: bool = True) -> None:
        pool = torch.cuda.graph_pool_handle()
        buckets = sorted(self.buckets, reverse=True)
        for batch in tqdm(buckets, desc="capturing CUDA graphs", unit="graph",
                          disable=not show_progress):
            input_ids, positions, metadata = self._padding_metadata(batch)
            # Warm-up outside the graph compiles the kernels for this shape.
            self.forward(input_ids, positions, metadata)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.forward(input_ids, positions, metadata)
            self._graphs[batch] = (graph, output)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batches up to %d", len(buckets),
                    self.max_batch)

    def bucket_for(self, num_reqs: int) -> Optional[int]:
        """The smallest captured bucket holding `num_reqs` decodes, or None."""
        for batch in self.buckets:
            if batch >= num_reqs and batch in self._graphs:
                return batch
        return None

    def replay(self, batch: int) -> torch.Tensor:
        """Run the bucket's graph over the buffers' current contents: hidden (batch, H)."""
        graph, output = self._graphs[batch]
        graph.replay()
        return output
