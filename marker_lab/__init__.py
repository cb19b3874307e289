"""marker_lab: persona-marker and emergent-misalignment experiments on chat LLMs (see README.md)."""

import os

# Training micro-batches and generation batches change shape all the time; expandable segments keep the CUDA
# caching allocator from fragmenting and falling back to synchronising frees (measured in docs/benchmarks.md).
# Only takes effect if set before CUDA starts, hence here; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
