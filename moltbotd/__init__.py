"""moltbotd: serve ONNX models to local programs from isolated worker processes."""

__version__ = "0.1.0"
