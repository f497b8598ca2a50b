"""What the daemon, its workers and clients share, with no I/O: frames and envelopes, the
operation table, signatures, units, file names of a version, log lines. moltctl imports
nothing else of moltbotd; nothing here imports onnxruntime or onnx."""
