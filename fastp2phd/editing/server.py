"""The web editor's HTTP server: a single page served on 127.0.0.1 over ``EditorApp`` (``app.py``).

``fastp2phd edit --name NAME`` loads the run's generator (and clusters), the test
scenes of its dataset and a few object masks, and serves the page and a small JSON
API. Requests use the generator one at a time, on one thread (``EditorApp.handle``), so
concurrent clicks queue instead of interleaving.

Three layers keep it safe on a machine whose browser visits other sites:

* the server (``EditorServer``, here) reads each request whole in one thread before a
  worker answers it, so slow, idle or flooding clients get 408 or 503 within seconds and
  never lock out the others (see its docstring and the limits below);
* the HTTP handler (``http_handler.make_handler``, http.server's request parsing) answers
  only requests whose ``Host`` is the address the editor listens on (DNS rebinding gets
  403), refuses state-changing requests from another ``Origin`` (403), takes JSON
  bodies only as ``application/json`` (415: so no plain form of another page can post
  one) with a valid ``Content-Length`` (400, or 413 over ``MAX_BODY``);
* ``EditorApp.handle`` validates every request: bad JSON, unknown operations,
  coordinates, labels or strokes out of range answer 400 with a sentence saying why,
  and the scene is left unchanged.

The editor's names of ``app.py`` and ``http_handler.py`` are re-exported here.
"""
from __future__ import annotations

import json
import queue
import re
import selectors
import shlex
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from ..errors import Pix2PixHDError
from ..specs import DataSpec
from .app import EditorApp, ObjectMask, RequestError, Scene, load_editor
from .http_handler import MAX_BODY, SEND_DEADLINE, allowed_hosts, make_handler

__all__ = ["ANSWER_WITHIN", "BUSY_RESPONSE", "Connection", "EditorApp", "EditorServer", "MAX_BODY", "ObjectMask",
           "REQUEST_DEADLINE", "RequestError", "SEND_DEADLINE", "Scene", "allowed_hosts", "http_error",
           "load_editor", "main_edit", "make_handler", "request_size", "serve"]

# What one client, or many, can hold (EditorServer): beyond the limits a client gets 503 at once.
# (MAX_BODY and SEND_DEADLINE, the handler's limits, are in http_handler.py.)
REQUEST_DEADLINE = 10.0  # seconds from connecting to the end of the request (not per read: a trickle counts too)
ANSWER_WITHIN = 4.0  # seconds a whole request may wait for a worker and the generator before it gets 503
LINGER = 2.0  # seconds the server reads (and drops) what a client still sends after its answer
MAX_WORKERS = 16  # requests answered at once (threads)
MAX_CONNECTIONS = 512  # connections open at once (being read or answered); with the lingering ones well
MAX_LINGERING = 256  # under the usual limit of 1024 file descriptors
MAX_PER_CLIENT = 384  # of them from one address (on 127.0.0.1 every local client shares it)
MAX_HEAD = 64 << 10  # bytes of request line and headers
MAX_BUFFERED = 64 << 20  # bytes of requests held at once, all connections together
BACKLOG = 1024  # connections the kernel queues before the server accepts them (capped by net.core.somaxconn)


@dataclass(eq=False)
class Connection:
    """A client connection while ``EditorServer`` reads its request, a worker answers it, or it lingers."""

    sock: socket.socket
    address: tuple
    deadline: float  # when the server gives up on it: the whole request must have arrived by then
    data: bytearray = field(default_factory=bytearray)
    size: int | None = None  # of the whole request, once its head has arrived
    answer_by: float = 0.0  # once the whole request has arrived: when it must have its answer (else 503)
    lingering: bool = False

    @property
    def client(self) -> str:
        return self.address[0]


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d{1,12})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def request_size(data: bytes, start: int = 0) -> int | None:
    """How many bytes the request at the start of ``data`` has (head and body), or None while its head
    is incomplete (the end of the head is searched from ``start``: a trickled head is not rescanned).
    A body the handler will refuse (too large, chunked, bad length) is not waited for."""
    end = _HEAD_END.search(data, max(start - 3, 0))
    if end is None:
        return None
    head = bytes(data[:end.end()])
    length = _CONTENT_LENGTH.search(head)
    if length is None or int(length.group(1)) > MAX_BODY or re.search(rb"(?im)^transfer-encoding:", head):
        return end.end()
    return end.end() + int(length.group(1))


def http_error(status: int, message: str) -> bytes:
    """A whole JSON error answer, sent by the server itself (no handler involved) before it closes."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.0 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"Cache-Control: no-store\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(), len(body), body))


BUSY_RESPONSE = http_error(503, "the editor is busy; try again in a moment")


class EditorServer:
    """The editor's HTTP server: one thread reads every request whole, with a deadline for the whole
    request, and hands complete ones to at most ``MAX_WORKERS`` worker threads.

    A slow or idle client costs a socket and a buffer, never a worker, and is answered 408 at its
    deadline; a client that already holds ``MAX_PER_CLIENT`` connections, or a full server
    (``MAX_CONNECTIONS``, ``MAX_BUFFERED``), gets 503 at once; so does a request that waits more than
    ``ANSWER_WITHIN`` seconds for a worker or the generator. One request per connection; after the answer the server
    reads what the client still sends for up to ``LINGER`` seconds before closing, so the answer is
    not lost to a TCP reset. As a context manager (``with serve(app) as server:``) it stops serving
    and closes its sockets on exit.
    """

    def __init__(self, address: tuple[str, int], handler=None):
        self.socket = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.RequestHandlerClass = handler
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()  # workers and shutdown() wake the loop through it
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self.open: dict[str, int] = {}  # client address -> connections being read or answered
        self.reading: set[Connection] = set()
        self.lingering: set[Connection] = set()
        self.waiting: deque[Connection] = deque()  # read whole, waiting for a worker
        self.done: queue.SimpleQueue[Connection] = queue.SimpleQueue()  # answered by a worker
        self.answering = 0  # requests handed to workers and not yet given back
        self.buffered = 0  # bytes in the ``data`` of counted connections
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()  # (serve() started serve_forever in a thread)
        self.server_close()

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # a bug: report it and keep serving the other clients
                    traceback.print_exc(file=sys.stderr)
        finally:
            self._stopped.set()

    def _step(self) -> None:
        for key, _ in self.selector.select(timeout=0.05):
            if key.fileobj is self.socket:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._drain_wakeups()
            else:
                self._read(key.data)
        while not self.done.empty():
            conn = self.done.get()
            self.answering -= 1
            self._release(conn)
            self._linger(conn)
        self._expire(time.monotonic())
        self._dispatch()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        for conn in [*self.reading, *self.lingering, *self.waiting]:
            conn.sock.close()
        while not self.done.empty():
            self.done.get().sock.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self.selector.close()

    # ------------------------------------------------------------------ the loop's steps
    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: the client stays queued until one is free
                return
            sock.setblocking(False)
            conn = Connection(sock, address, time.monotonic() + REQUEST_DEADLINE)
            if sum(self.open.values()) >= MAX_CONNECTIONS or self.open.get(conn.client, 0) >= MAX_PER_CLIENT:
                self._refuse(conn, BUSY_RESPONSE)
                continue
            self.open[conn.client] = self.open.get(conn.client, 0) + 1
            self.reading.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = None  # reset by the client
        if conn.lingering:
            if not chunk:
                self._end_linger(conn)
            return
        if not chunk:
            if chunk is None or not conn.data:
                self._stop_reading(conn)
                conn.sock.close()
            else:  # the client stopped sending: answer what it sent (a cut-off request gets its 400)
                self._ready(conn)
            return
        if self.buffered + len(chunk) > MAX_BUFFERED:
            self._stop_reading(conn)
            self._refuse(conn, BUSY_RESPONSE)
            return
        conn.data += chunk
        self.buffered += len(chunk)
        if conn.size is None:
            conn.size = request_size(conn.data, len(conn.data) - len(chunk))
        if conn.size is None and len(conn.data) > MAX_HEAD:
            status = 414 if b"\n" not in conn.data else 431
            self._stop_reading(conn)
            self._refuse(conn, http_error(status, f"the request line and headers are longer than {MAX_HEAD} bytes"))
        elif conn.size is not None and len(conn.data) >= conn.size:
            self._ready(conn)

    def _ready(self, conn: Connection) -> None:
        self.selector.unregister(conn.sock)
        self.reading.discard(conn)
        conn.answer_by = time.monotonic() + ANSWER_WITHIN
        self.waiting.append(conn)

    def _dispatch(self) -> None:
        while self.waiting and self.answering < MAX_WORKERS:
            self.answering += 1
            threading.Thread(target=self._answer, args=(self.waiting.popleft(),), daemon=True).start()

    def _answer(self, conn: Connection) -> None:
        """(a worker thread) Answers ``conn``'s request and gives the connection back to the loop."""
        try:
            conn.sock.setblocking(True)
            self.RequestHandlerClass(conn, conn.address, self)
        except OSError:  # the client went away or did not read its answer in time: nothing to tell it
            pass
        except Exception:  # a bug: keep serving, leave the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
        finally:
            if self._stopped.is_set():  # nobody will take it back
                conn.sock.close()
            self.done.put(conn)
            self._wake()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.reading if c.deadline <= now]:
            self._stop_reading(conn)
            self._refuse(conn, http_error(408, f"the whole request must arrive within {REQUEST_DEADLINE:g} seconds"))
        while self.waiting and self.waiting[0].answer_by <= now:
            conn = self.waiting.popleft()
            self._release(conn)
            self._refuse(conn, BUSY_RESPONSE)
        for conn in [c for c in self.lingering if c.deadline <= now]:
            self._end_linger(conn)

    def _refuse(self, conn: Connection, answer: bytes) -> None:
        """Sends ``answer`` (small: it fits the empty send buffer of a connection that was never answered)."""
        try:
            conn.sock.send(answer)
        except OSError:
            pass
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        """Stops sending on ``conn`` and reads (and drops) what the client still sends, until it closes
        or ``LINGER`` seconds pass: closing with unread data would reset the connection and could
        destroy the answer before the client reads it."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            conn.sock.close()
            return
        if len(self.lingering) >= MAX_LINGERING:  # (refused floods must not exhaust file descriptors)
            conn.sock.close()
            return
        conn.sock.setblocking(False)
        conn.lingering, conn.deadline = True, time.monotonic() + LINGER
        self.lingering.add(conn)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _end_linger(self, conn: Connection) -> None:
        self.lingering.discard(conn)
        self.selector.unregister(conn.sock)
        conn.sock.close()

    def _stop_reading(self, conn: Connection) -> None:
        self._release(conn)
        self.reading.discard(conn)
        self.selector.unregister(conn.sock)

    def _release(self, conn: Connection) -> None:
        """``conn`` no longer counts against its client's connections, nor its request against MAX_BUFFERED."""
        self.buffered -= len(conn.data)
        conn.data = bytearray()
        left = self.open[conn.client] - 1
        if left:
            self.open[conn.client] = left
        else:
            del self.open[conn.client]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full (the loop will wake anyway) or the server is closed
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass


def serve(app: EditorApp, host: str = "127.0.0.1", port: int = 8765) -> EditorServer:
    """A started server (in a daemon thread); ``server.server_address`` has the port, ``shutdown()`` stops it."""
    server = EditorServer((host, port))
    server.RequestHandlerClass = make_handler(app, host, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def main_edit(model, data: DataSpec, *, name: str, run_folder: Path, host: str, port: int, max_scenes: int,
              seed: int, which_epoch: str = "latest") -> int:
    """``fastp2phd edit``: serve the editor until Ctrl+C; "save" writes into ``run_folder/edits``."""
    from ..train_state import trained_classes

    save_dir = run_folder / "edits"
    # The command that regenerates the saved scenes: the checkpoint, precision and device the editor generated
    # with (`test` defaults to fp32 where `edit` picks auto), so it gives the editor's images; quoted for a shell.
    device = next(model.parameters()).device
    checkpoints_dir = run_folder.parents[len(Path(name).parts) - 1]  # (a name may hold '/': exp/run)
    command = shlex.join([Path(sys.executable).name, "-m", "fastp2phd", "test", "--name", name, "--checkpoints_dir",
                          str(checkpoints_dir), "--which_epoch", str(which_epoch), "--dataroot", str(save_dir),
                          "--resize_or_crop", "none", "--precision", model.precision, "--device", str(device)])
    try:
        app = load_editor(model, data, max_scenes=max_scenes, seed=seed, trained_classes=trained_classes(run_folder),
                          save_dir=save_dir, test_command=command)
    except (Pix2PixHDError, ValueError) as exc:
        print(f"fastp2phd edit: {exc}", file=sys.stderr)
        return 1
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the editor listens on {host}: anyone who can reach this machine can use it", file=sys.stderr)
    try:
        server = serve(app, host, port)
    except OSError as exc:
        print(f"fastp2phd edit: cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port",
              file=sys.stderr)
        return 1
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"editing {len(app.scenes)} scenes of {name} on {device} in {model.precision}: open http://{shown}:{bound_port}/ "
          f"(Ctrl+C to stop); saved scenes go to {save_dir}")
    with server:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
