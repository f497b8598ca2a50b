"""cgroup v2 for the daemon: the file interface, limits as cgroup files and usage
counters, and the strict / best-effort / off policy."""
