"""The conversion job: `python -m moltbotd.convert CONTROL` makes a cheaper version of a
model (INT8, FP16, an optimized graph) with onnxruntime's own tools, and measures it
against its source. A process of its own, spawned by the daemon into the model's cgroup:
the daemon runs no model."""
