"""The worker process (`python -m moltbotd.worker FD`): one onnxruntime session, its
channel to the daemon, direct channels to clients and the lanes serving them, and its
heartbeat. It imports nothing of the daemon's control or serving code."""
