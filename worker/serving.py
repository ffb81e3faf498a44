"""The engine a served replica runs (`lmfleet worker`, a Ray replica), built from a model
and engine options by key (worker/options.py), with the name clients use for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional


def build_engine(model: str, options: Mapping[str, Any], model_name: Optional[str] = None,
                 start_ranks=None):
    """Load `model` and build its LLMEngine; returns (engine, served name). The name is
    `model_name`, else what `lmfleet serve` calls the model ("default" for the embedded
    one, a directory's name, a .gguf file's stem). `start_ranks`: see LLMEngine."""
    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.engine import LLMEngine
    from lmfleet.worker.model.default_model import served_model_name

    engine = LLMEngine(EngineConfig.from_options(model, **options), start_ranks=start_ranks)
    return engine, model_name or served_model_name(model)
