"""A TCP proxy between an agent and the cloud that misbehaves on demand, as a site's link
does: it delays, throttles, cuts connections after some bytes, black-holes them, or
refuses new ones. Faults change while connections are open; counters say what passed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LinkFaults:
    """What the link does now; change the fields at any time."""

    delay_s: float = 0.0  # added before each forwarded piece
    down_bytes_per_s: float = 0.0  # cloud -> agent bandwidth cap (0: none)
    cut_after_bytes: int = 0  # close a connection once it carried this many bytes down
    blackhole: bool = False  # forward nothing (a dead route: no RST, no FIN)
    refuse: bool = False  # close new connections at once


@dataclass
class LinkCounters:
    connections: int = 0
    cuts: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to `upstream` ("host:port")."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host.strip("[]"), int(port))
        self.faults = LinkFaults()
        self.counters = LinkCounters()
        # Set to a bytearray to record every byte that passes, both ways (what a tap sees).
        self.capture: bytearray | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.faults.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.counters.add("connections", 1)
            with self._lock:
                self._sockets |= {client, server}
            carried = [0]
            for src, dst, down in ((server, client, True), (client, server, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, down, carried), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, carried: list[int]) -> None:
        try:
            while not self._closed.is_set():
                data = src.recv(16 << 10)
                if not data:
                    break
                f = self.faults
                while f.blackhole and not self._closed.is_set():
                    time.sleep(0.05)  # swallowed: the peer sees silence, not a close
                if f.delay_s:
                    time.sleep(f.delay_s)
                if down and f.down_bytes_per_s:
                    time.sleep(len(data) / f.down_bytes_per_s)
                if down and f.cut_after_bytes and carried[0] + len(data) > f.cut_after_bytes:
                    keep = max(0, f.cut_after_bytes - carried[0])
                    dst.sendall(data[:keep])
                    self.counters.add("bytes_down", keep)
                    self.counters.add("cuts", 1)
                    break
                dst.sendall(data)
                if self.capture is not None:
                    self.capture += data
                if down:
                    carried[0] += len(data)
                self.counters.add("bytes_down" if down else "bytes_up", len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._sockets -= {src, dst}

    def cut_all(self) -> None:
        """Close every open connection now (a link flap)."""
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.counters.add("cuts", len(sockets) // 2)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.cut_all()
