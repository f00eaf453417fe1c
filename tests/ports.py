"""A free local TCP port for a test's coordinator or server (the OS picks it; a race with another process taking it
before use is possible but rare)."""
import socket


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
