"""Triton kernels on a machine without CUDA run under Triton's interpreter
(TRITON_INTERPRET=1), which must be set before triton is first imported: the root
conftest calls `enable_without_cuda()` before any test module loads."""

from __future__ import annotations

import importlib.util
import os

import torch


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns scalar tensors (1-element arrays) into loop bounds with
    int(array), which NumPy >= 2.4 rejects; convert through the single element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixed_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.fixed_index = True
    interpreter._patch_lang_tensor = patched


def enable_without_cuda() -> None:
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        _fix_interpreter_index()
