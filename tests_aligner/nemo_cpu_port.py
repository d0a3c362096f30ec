"""A free TCP port for a torchrun rendezvous (no NeMo import: the test process stays light)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
