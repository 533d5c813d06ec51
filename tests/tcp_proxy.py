"""A loopback TCP proxy whose link can be cut (a database or object store that goes away) or
held (a slow one), and that can keep what clients sent (the requests a server received)."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, keep_sent: bool = False
    ) -> None:
        """``keep_sent``: keep every byte the clients send (:meth:`sent`)."""
        self.target = (target_host, target_port)
        self._sent: bytearray | None = bytearray() if keep_sent else None
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # an idle pooled connection stays open, as without a proxy
            with self._lock:
                self._connections += [client, upstream]
            for a, b, kept in ((client, upstream, self._sent), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, kept), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, kept: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                if kept is not None:
                    with self._lock:
                        kept += data
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until :meth:`restore`."""
        self._up = False
        with self._lock:
            for s in self._connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._connections.clear()

    def restore(self) -> None:
        self._up = True

    def hold(self) -> None:
        """Stop passing bytes on, either way, until :meth:`release`: connections stay open,
        every request waits (a server that stalls)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def sent(self) -> bytes:
        """Every byte the clients have sent so far (``keep_sent``)."""
        assert self._sent is not None, "TcpProxy(keep_sent=True) keeps them"
        with self._lock:
            return bytes(self._sent)

    def close(self) -> None:
        self.release()
        self.cut()
        self._listener.close()
