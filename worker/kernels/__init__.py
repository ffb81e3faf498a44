"""GPU kernels (Triton) for the worker: attention over the paged KV cache."""
