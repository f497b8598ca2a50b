"""Sockets systemd opened for the daemon (socket activation, sd_listen_fds(3)).

The package's moltbotd-metrics.socket listens on 127.0.0.1:8474 in the host's network
namespace and hands the socket over when moltbotd starts: the service itself keeps
PrivateNetwork=yes and RestrictAddressFamilies=AF_UNIX (they restrict the sockets a
process creates, not those it is given).
"""

import os
import socket
from collections.abc import MutableMapping

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> dict[str, socket.socket]:
    """The sockets passed to this process, by their FileDescriptorName= ("unknown" when
    unnamed). The variables are removed, so that no child takes them for its own."""
    mine = environ.get("LISTEN_PID") == str(os.getpid())
    count = environ.get("LISTEN_FDS", "0")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in VARIABLES:
        environ.pop(name, None)
    if not mine or not count.isdigit():
        return {}
    sockets = {}
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        sockets[name] = socket.socket(fileno=fd)
    return sockets
