"""A lifeline between the processes of a multi-process run: a dead peer is known at once.

Process 0 listens on the coordinator's host (a port the OS picks, published in JAX's
key-value store) and every other process keeps one TCP connection to it. The kernel
closes a killed process's sockets, so when a process dies (SIGKILL, out of memory, a
crash) the others learn it within a moment, wherever they are blocked: a collective
that will never finish, a barrier, the rendezvous of a new collective group. Without
it JAX ends them only after its heartbeat timeout, with a fatal error and a C++ stack.
Process 0 tells the others which process is gone before it exits itself. A process that
leaves by design (any exit through Python, errors included) says goodbye first, and a
process that is leaving ignores the others' connections closing. A host that vanishes
without closing its connections is still found by JAX's heartbeats.

`on_lost(who, cause)` is called once, on the watching thread, and must end the process.
"""

from __future__ import annotations

import atexit
import selectors
import socket
import threading
from typing import Callable

KEY = "shardlm/lifeline"
BYE = "bye"

_connections: list[socket.socket] = []
_leaving = threading.Event()


def start(client, me: int, host: str, timeout_s: float,
          on_lost: Callable[[int, str], None]) -> None:
    """After jax.distributed.initialize: `client` is JAX's distributed runtime client."""
    if me == 0:
        server = socket.create_server((host, 0))
        client.key_value_set(KEY, f"{host}:{server.getsockname()[1]}")
        threading.Thread(target=_serve, args=(server, on_lost), daemon=True,
                         name="lifeline").start()
    else:
        address = client.blocking_key_value_get(KEY, int(timeout_s * 1000))
        where, port = address.rsplit(":", 1)
        sock = socket.create_connection((where, int(port)), timeout=timeout_s)
        sock.settimeout(None)
        sock.sendall(f"{me}\n".encode())
        _connections.append(sock)
        threading.Thread(target=_watch, args=(sock, on_lost), daemon=True,
                         name="lifeline").start()
    atexit.register(leave)


def leave() -> None:
    """Goodbye to the peers: this process's connections closing is no alarm."""
    _leaving.set()
    for sock in list(_connections):
        try:
            sock.sendall(f"{BYE}\n".encode())
        except OSError:
            pass


def _lines(sock: socket.socket, pending: bytearray) -> list[str] | None:
    """The whole lines that arrived; None at end of stream."""
    try:
        data = sock.recv(4096)
    except OSError:
        data = b""
    if not data:
        return None
    pending += data
    *whole, rest = pending.split(b"\n")
    pending[:] = rest
    return [w.decode() for w in whole]


def _watch(sock: socket.socket, on_lost: Callable[[int, str], None]) -> None:
    """Another process's side: process 0 says who is gone, or its connection closes."""
    pending = bytearray()
    while True:
        lines = _lines(sock, pending)
        if lines is None:
            if not _leaving.is_set():
                on_lost(0, "its connection closed")
            return
        for line in lines:
            if line == BYE:
                return  # process 0 is leaving by design
            if line.startswith("lost ") and not _leaving.is_set():
                on_lost(int(line.split()[1]), "its connection to process 0 closed")
                return


def _serve(server: socket.socket, on_lost: Callable[[int, str], None]) -> None:
    """Process 0's side: accept every process's connection and watch them all."""
    select = selectors.DefaultSelector()
    select.register(server, selectors.EVENT_READ)
    peers: dict[socket.socket, list] = {}  # connection -> [process id or None, pending]
    while True:
        for key, _ in select.select():
            if key.fileobj is server:
                sock, _ = server.accept()
                peers[sock] = [None, bytearray()]
                _connections.append(sock)
                select.register(sock, selectors.EVENT_READ)
                continue
            sock = key.fileobj
            who, pending = peers[sock]
            lines = _lines(sock, pending)
            if lines is None:
                select.unregister(sock)
                _connections.remove(sock)
                if who is not None and not _leaving.is_set():
                    for other in list(_connections):  # name the lost one to the rest
                        try:
                            other.sendall(f"lost {who}\n".encode())
                        except OSError:
                            pass
                    on_lost(who, "its connection closed")
                    return
                continue
            for line in lines:
                if line == BYE:
                    peers[sock][0] = None  # leaving by design: its close is no alarm
                elif peers[sock][0] is None and line.isdigit():
                    peers[sock][0] = int(line)
