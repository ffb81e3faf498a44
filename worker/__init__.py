"""lmfleet's replica side: the inference engine and its offline Python API."""

from lmfleet.worker.llm import LLM
from lmfleet.worker.request import CompletionOutput, RequestOutput, TokenLogprobs
from lmfleet.worker.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TokenLogprobs"]
