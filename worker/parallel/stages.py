"""Which decoder layers a pipeline stage holds.

Layers are split evenly; when they do not divide, the later stages take one more each,
because stage 0 also holds the embedding, the LM head and the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineStage:
    index: int
    size: int  # number of stages
    start: int  # first layer held
    end: int  # one past the last layer held

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def holds_layer(self, layer: int) -> bool:
        return self.start <= layer < self.end


def pipeline_stage(num_layers: int, size: int = 1, index: int = 0) -> PipelineStage:
    if size > num_layers:
        raise ValueError(f"pipeline_parallel_size={size} is more than the model's "
                         f"{num_layers} layers: every stage needs at least one")
    base, extra = divmod(num_layers, size)
    # Stage i holds base layers, plus one if it is among the last `extra` stages.
    start = index * base + max(0, index - (size - extra))
    end = start + base + (1 if index >= size - extra else 0)
    return PipelineStage(index, size, start, end)
