"""lmfleet's replica side: the inference engine and its offline Python API.

The names below load on first use, so light modules of the package (worker/options.py,
which the command line reads to build its flags) import without torch.
"""

import importlib

_EXPORTS = {
    "LLM": "lmfleet.worker.llm",
    "SamplingParams": "lmfleet.worker.sampling_params",
    "RequestOutput": "lmfleet.worker.request",
    "CompletionOutput": "lmfleet.worker.request",
    "TokenLogprobs": "lmfleet.worker.request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmfleet.worker' has no attribute {name!r}")
