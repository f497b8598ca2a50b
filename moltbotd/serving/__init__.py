"""The daemon's data plane: a version's pool of worker processes, its queue, and the
handle on each worker process (spawn, handshake, requests in flight, restart)."""
