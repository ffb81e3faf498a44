"""Tensor-parallel linear and embedding layers: the building blocks the model names.

Each layer holds this rank's shard of its weight and gives every parameter a
`weight_loader(param, loaded_weight, shard_id=None)` that narrows the full checkpoint
tensor to that shard (the vLLM / nano-vllm scheme), so the checkpoint loader stays generic.

- column-parallel layers split output features (no communication: each rank keeps its
  slice of the output, which the next row-parallel layer consumes as its input shard);
- row-parallel layers split input features and sum the partial outputs (all-reduce);
- the vocab-parallel embedding and LM head split the vocabulary (rows padded up to a
  multiple of tp; padding rows stay zero and their logits are cut off).

At tp = 1 every layer runs exactly the op of the nn.Linear / nn.Embedding it replaces
(F.linear with its bias, or `x @ W_t + b` after the CPU transpose pass), so single-rank
outputs are bit-identical to before. The rank and size come from worker.parallel.state
unless given (tests build every rank's shard in one process).

A linear layer built with a `WeightQuantization` holds the quantized format's tensors
instead of `weight` (worker/quant/: AWQ's packed codes, zeros and scales stored (in,
out), or GGUF's packed block rows); each parameter's `ParamLayout` says which of its
axes are the output and input features, so the same loaders shard plain and packed
weights (in stored elements: whole packed int32s, whole blocks).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.worker.parallel import state
from lmfleet.worker.quant import methods
from lmfleet.worker.quant.config import WeightQuantization
from lmfleet.worker.quant.layout import ParamLayout

ShardId = Union[None, int, str]


def divide(numerator: int, tp: int, what: str) -> int:
    if numerator % tp:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={tp}")
    return numerator // tp


def load_shard(destination: torch.Tensor, loaded: torch.Tensor, dim: int, rank: int,
               full_size: int) -> None:
    """Copy this rank's slice of `loaded` along dim into destination (a whole parameter or
    one part of a fused one). `loaded` must be unsharded: full_size along dim, the
    destination's size elsewhere. The last vocab shard may run past full_size: its extra
    rows are padding, zeroed."""
    size = destination.shape[dim]
    expected = list(destination.shape)
    expected[dim] = full_size
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(expected)}")
    start = rank * size
    valid = max(0, min(size, full_size - start))
    with torch.no_grad():
        destination.narrow(dim, 0, valid).copy_(loaded.narrow(dim, start, valid))
        if valid < size:
            destination.narrow(dim, valid, size - valid).zero_()


class LinearBase(nn.Module):
    """weight (out_local, in_local) as nn.Linear stores it, bias (out_local,) or None; or,
    quantized, the format's tensors (worker/quant/methods.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp_rank: Optional[int], tp_size: Optional[int],
                 quant: Optional[WeightQuantization] = None) -> None:
        super().__init__()
        self.tp_rank = state.get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = state.get_tp_size() if tp_size is None else tp_size
        self.in_features = in_features  # this rank's
        self.out_features = out_features  # this rank's
        self.quant = quant
        self.layouts: dict[str, ParamLayout] = {}
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features),
                                       requires_grad=False)
            self.layouts["weight"] = ParamLayout(out_dim=0, in_dim=1)
        else:
            methods.create_parameters(self, in_features, out_features, quant)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.layouts["bias"] = ParamLayout(out_dim=0, in_dim=None)
        else:
            self.register_parameter("bias", None)
        self.weight_t: Optional[nn.Parameter] = None  # (in, out), set by transpose_weight
        self._bind_loaders()

    def layout(self, param: nn.Parameter) -> ParamLayout:
        for name, own in self._parameters.items():
            if own is param:
                return self.layouts[name]
        raise ValueError("not a parameter of this layer")

    def _bind_loaders(self) -> None:
        # Module.to / to_empty may replace Parameter objects (meta -> real), dropping
        # attributes set on them, so the loaders are bound again after every _apply.
        for param in self._parameters.values():
            if param is not None:
                param.weight_loader = self.weight_loader

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._bind_loaders()
        return module

    def transpose_weight(self) -> None:
        """The CPU pass (cpu_linear.py): multiply by a contiguous (in, out) copy instead;
        the (out, in) weight is dropped (a tied one stays with the embedding)."""
        if self.quant is not None:
            return  # already stored (in, out)
        weight_t = self.weight.detach().t().contiguous()  # (in, out)
        del self._parameters["weight"]
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.quant is not None:
            return methods.apply(self, x, bias)  # (T, out)
        if self.weight_t is not None:  # the same ops as cpu_linear.TransposedLinear
            out = torch.matmul(x, self.weight_t)  # (T, out)
            return out if bias is None else out + bias
        return F.linear(x, self.weight, bias)  # (T, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, in)
        return self._linear(x, self.bias)  # (T, out)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    """The whole layer on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        super().__init__(in_features, out_features, bias, tp_rank, tp_size)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        load_shard(param.data, loaded, 0, 0, param.shape[0])


class ColumnParallelLinear(LinearBase):
    """Output features split: rank r holds rows [r * out/tp, (r+1) * out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None,
                 quant: Optional[WeightQuantization] = None) -> None:
        tp = state.get_tp_size() if tp_size is None else tp_size
        super().__init__(in_features, divide(out_features, tp, "out_features"), bias,
                         tp_rank, tp, quant)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        dim = self.layout(param).out_dim
        load_shard(param.data, loaded, dim, self.tp_rank, param.shape[dim] * self.tp_size)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs in one matmul (gate/up): each part is split on its
    own, so rank r holds [part0 slice r, part1 slice r, ...]; shard_id is the part index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None,
                 what: str = "output size", quant: Optional[WeightQuantization] = None) -> None:
        tp = state.get_tp_size() if tp_size is None else tp_size
        self.local_sizes = [divide(size, tp, what) for size in output_sizes]
        if quant is not None:  # each part must start on a packed element
            methods.check_output_parts(quant, self.local_sizes)
        super().__init__(in_features, sum(self.local_sizes), bias, tp_rank, tp, quant)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        layout = self.layout(param)
        dim, pack = layout.out_dim, layout.out_pack
        local = [size // pack for size in self.local_sizes]  # stored elements per part
        if shard_id is None:  # an already fused checkpoint tensor: split it into parts
            full = [size * self.tp_size for size in local]
            if loaded.shape[dim] != sum(full):
                raise ValueError(f"has shape {tuple(loaded.shape)}, expected {sum(full)} "
                                 f"along dim {dim}")
            for index, part in enumerate(loaded.split(full, dim=dim)):
                self.weight_loader(param, part, index)
            return
        offset, size = sum(local[:shard_id]), local[shard_id]
        load_shard(param.data.narrow(dim, offset, size), loaded, dim, self.tp_rank,
                   size * self.tp_size)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v in one matmul, split by heads: rank r holds q heads
    [r * Hq/tp, (r+1) * Hq/tp) and likewise for the KV heads; shard_id "q", "k" or "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: Optional[int] = None,
                 tp_size: Optional[int] = None,
                 quant: Optional[WeightQuantization] = None) -> None:
        tp = state.get_tp_size() if tp_size is None else tp_size
        self.num_heads = divide(num_heads, tp, "num_attention_heads")  # this rank's
        self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim,
                                       num_kv_heads * head_dim], bias, tp_rank, tp,
                         quant=quant)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
        super().weight_loader(param, loaded, index)


class RowParallelLinear(LinearBase):
    """Input features split: rank r holds columns [r * in/tp, (r+1) * in/tp) and its
    output is a partial sum; the all-reduce completes it. The bias, whole on every rank,
    is added once, after the reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None,
                 what: str = "in_features", quant: Optional[WeightQuantization] = None) -> None:
        tp = state.get_tp_size() if tp_size is None else tp_size
        super().__init__(divide(in_features, tp, what), out_features, bias, tp_rank, tp,
                         quant)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        dim = self.layout(param).in_dim
        if dim is None:  # the bias: not split
            load_shard(param.data, loaded, 0, 0, param.shape[0])
        else:
            load_shard(param.data, loaded, dim, self.tp_rank, param.shape[dim] * self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, in/tp)
        if self.tp_size == 1:  # the op nn.Linear runs (the bias fused in, as before)
            return self._linear(x, self.bias)  # (T, out)
        out = state.all_reduce(self._linear(x, None))  # (T, out)
        return out if self.bias is None else out + self.bias


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """(first id, rows) of rank's vocab shard: ceil(V / tp) rows each, the last shard
    padded past V."""
    rows = -(-vocab_size // tp)
    return rank * rows, rows


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by token id; ids outside this rank's shard embed to zero and
    the all-reduce adds the one rank's row to zeros (exact)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: Optional[int] = None,
                 tp_size: Optional[int] = None) -> None:
        super().__init__()
        self.tp_rank = state.get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = state.get_tp_size() if tp_size is None else tp_size
        self.vocab_size = vocab_size
        self.vocab_start, rows = vocab_shard(vocab_size, self.tp_size, self.tp_rank)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self._bind_loaders()

    def _bind_loaders(self) -> None:
        self.weight.weight_loader = self.weight_loader

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._bind_loaders()
        return module

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        load_shard(param.data, loaded, 0, self.tp_rank, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # (T, H)
        local = input_ids - self.vocab_start  # (T,)
        outside = (local < 0) | (local >= self.weight.shape[0])  # (T,)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, H)
        return state.all_reduce(out.masked_fill_(outside[:, None], 0))


class ParallelLMHead(LinearBase):
    """hidden (N, H) -> logits (N, V): each rank scores its vocab shard, the shards are
    gathered (every rank gets the full logits; only rank 0 samples). Its weight has the
    embedding's layout, so a tied checkpoint shares the embedding's parameter."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: Optional[int] = None,
                 tp_size: Optional[int] = None) -> None:
        tp = state.get_tp_size() if tp_size is None else tp_size
        rank = state.get_tp_rank() if tp_rank is None else tp_rank
        self.vocab_size = vocab_size
        _, rows = vocab_shard(vocab_size, tp, rank)
        super().__init__(hidden_size, rows, False, rank, tp)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        load_shard(param.data, loaded, 0, self.tp_rank, self.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, H)
        logits = self._linear(x, None)  # (N, V/tp)
        if self.tp_size == 1:
            return logits
        return state.all_gather(logits, dim=-1)[:, :self.vocab_size]  # (N, V)
