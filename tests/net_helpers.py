"""Misbehaving endpoints on 127.0.0.1 for the fail-fast tests: a refused port, a socket that accepts and
never answers, and a TCP proxy that drops its first connections. Each is bounded and closed by its test."""

from __future__ import annotations

import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused_endpoint() -> str:
    """An http:// URL on a loopback port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


class _Listener:
    """A loopback listening socket whose accepted connections go to `handle`, in a thread until `close`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SilentServer(_Listener):
    """Accepts connections and never answers (the endpoint that stalled a pipeline for minutes)."""

    def __init__(self) -> None:
        self.conns: list[socket.socket] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.conns.append(conn)  # held open, never read, never answered

    def close(self) -> None:
        super().close()
        for c in self.conns:
            c.close()


class FlakyProxy(_Listener):
    """Forwards TCP to ``target_port`` on 127.0.0.1, except that its first ``drop_first`` connections are
    reset at once without an answer (a store restarting)."""

    def __init__(self, target_port: int, drop_first: int) -> None:
        self.target_port, self.drop_left, self.dropped = target_port, drop_first, 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        if self.drop_left > 0:
            self.drop_left -= 1
            self.dropped += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST: the client sees the connection reset
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(30)
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
