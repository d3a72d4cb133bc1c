"""Triton's system shared-memory extension: clients on this device hand large tensors (camera
frames) over through POSIX shared memory (/dev/shm) instead of the request's bytes.

A client creates an object with shm_open (tritonclient.utils.shared_memory, Python's
multiprocessing.shared_memory), registers it under a name with SystemSharedMemoryRegister
(key, offset, byte_size), and then names the region in an input's or output's
``shared_memory_region`` / ``shared_memory_offset`` / ``shared_memory_byte_size`` parameters.

Confined:

- only clients on this host (a loopback peer) may register; a key is a shared-memory name
  ("/" then letters, digits, '.', '_' or '-'), opened as /dev/shm/<name> without following
  links, and must be a regular file owned by the client's user (found in the kernel's socket
  table for the client's end of the connection; our own user where it cannot be found);
- the region (offset, byte_size) must lie within the file when registered, and every read or
  write within the region; the agent reads and writes with pread/pwrite on the file rather
  than mapping it, so a client that shrinks the file afterwards gets an error, never a
  SIGBUS that would kill the agent, and nothing beyond the region is ever read or written;
- a client holds at most `max_regions` regions of at most `max_bytes` in all; the agent at
  most `max_total` open regions.

Cleaned: regions belong to the connection that registered them: its gRPC peer address and
the kernel's socket behind it (the inode and user of the client's TCP socket in
/proc/net/tcp{,6}, recorded when registering). Every use, status and unregister checks that
the peer address still is that same socket: a client that connects later from the same
source port (another user can bind a port the victim just freed) is another socket, and
neither sees nor uses the regions, which are closed. Another connection neither sees nor
uses them. They are closed when unregistered (by name, or
all of the client's with an empty name) and when the connection is gone: a sweeper thread,
running while any region is open, reads the kernel's socket table (Linux /proc/net/tcp and
tcp6) every `sweep_interval_s` and closes the regions of connections that are no longer
established or whose socket is another than the one that registered. Where that table
cannot be read (not Linux) regions are keyed by the peer address alone, as before: they stay
until unregistered or the server stops (the per-client and total caps still bound them), and
a later connection from the same address and port would inherit them. A region in use by a request
is closed once that request is done with it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from agent.errors import (
    AlreadyExists,
    Forbidden,
    InvalidRequest,
    RegionNotFound,
    RequestTooLarge,
)

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
_KEY = re.compile(r"/?([A-Za-z0-9._-]{1,255})")
_ESTABLISHED = "01"


@dataclass(frozen=True)
class Connection:
    """The client's end of a TCP connection as the kernel knows it."""

    inode: int
    uid: int


# The table was read and the peer has no established socket in it (any more).
GONE = Connection(0, -1)


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    __slots__ = (
        "byte_size",
        "closing",
        "connection",
        "fd",
        "key",
        "name",
        "offset",
        "users",
        "writable",
    )

    def __init__(
        self,
        name: str,
        key: str,
        fd: int,
        offset: int,
        byte_size: int,
        writable: bool,
        connection: Connection | None = None,
    ) -> None:
        self.name = name
        # The socket that registered it; None where the socket table cannot be read.
        self.connection = connection
        self.key = key
        self.fd = fd
        self.offset = offset
        self.byte_size = byte_size
        self.writable = writable
        self.users = 0  # requests using it now; closed when 0 and closing
        self.closing = False

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)


def parse_peer(peer: str) -> tuple[str, int] | None:
    """gRPC's peer string ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000") as (address, port);
    None for anything else (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")  # gRPC writes "ipv6:%5B::1%5D:5000"
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
        number = int(port)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped), number
    return str(address), number


def is_loopback(peer: str) -> bool:
    parsed = parse_peer(peer)
    return parsed is not None and ipaddress.ip_address(parsed[0]).is_loopback


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp* (hex, in 32-bit words of host byte order)."""
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    packed = b"".join(struct.pack("=I", w) for w in words)
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else str(address)


_PROC_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

# (local address, port) -> every socket bound there: (state, uid, inode, remote address, port)
Sockets = dict[tuple[str, int], list[tuple[str, int, int, tuple[str, int]]]]


def socket_entries(paths: tuple[Path, ...] = _PROC_TCP) -> Sockets | None:
    """Every TCP socket of this network namespace, by its local address and port; None where
    the table cannot be read (not Linux)."""
    table: Sockets = {}
    read = False
    for path in paths:
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            host, _, port = fields[1].partition(":")
            remote_host, _, remote_port = fields[2].partition(":")
            try:
                key = (_address(host), int(port, 16))
                remote = (_address(remote_host), int(remote_port, 16))
                uid = int(fields[7])
                inode = int(fields[9])
            except (ValueError, OSError):
                continue
            table.setdefault(key, []).append((fields[3], uid, inode, remote))
    return table if read else None


def connection_of(client: str, table: Sockets | None) -> Connection | None:
    """The client's socket (the established one whose local end is the gRPC peer address):
    GONE where there is none, or no telling which; None where that cannot be told at all
    (no socket table, or a peer that is not an IP address)."""
    peer = parse_peer(client)
    if peer is None or table is None:
        return None
    found = [e for e in table.get(peer, []) if e[0] == _ESTABLISHED and e[2]]
    if len(found) > 1:  # several sockets on that port: the one connected to one of ours
        me = os.geteuid()
        found = [
            e
            for e in found
            if any(o[0] == _ESTABLISHED and o[1] == me for o in table.get(e[3], []))
        ]
    if len(found) != 1:
        return GONE
    return Connection(found[0][2], found[0][1])


def socket_table(
    paths: tuple[Path, ...] = _PROC_TCP,
) -> dict[tuple[str, int], tuple[str, int]] | None:
    """`socket_entries` as (local address, port) -> (state, uid) of one socket there: the
    established one where there is one (an old connection's TIME_WAIT must not hide it)."""
    entries = socket_entries(paths)
    if entries is None:
        return None
    return {
        key: next(((e[0], e[1]) for e in found if e[0] == _ESTABLISHED), found[0][:2])
        for key, found in entries.items()
    }


class SharedMemoryRegions:
    """The registered regions of every client; thread-safe."""

    def __init__(
        self,
        *,
        root: Path = SHM_ROOT,
        max_regions: int = 16,
        max_bytes: int = 1 << 30,
        max_total: int = 256,
        sweep_interval_s: float = 2.0,
        loopback_only: bool = True,
    ) -> None:
        self.root = root
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.max_total = max_total
        self.sweep_interval_s = sweep_interval_s
        self.loopback_only = loopback_only
        self._lock = threading.Lock()
        self._clients: dict[str, dict[str, _Region]] = {}
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.swept = 0  # regions closed because their connection went away

    # -- the extension's three calls ------------------------------------------------------

    def register(self, client: str, name: str, key: str, offset: int, byte_size: int) -> None:
        if self.loopback_only and not is_loopback(client):
            raise Forbidden(
                "system shared memory is for clients on this device (a loopback connection); "
                f"this call came from {client[:80]}; send tensors in the request instead"
            )
        if not name or len(name) > 128:
            raise InvalidRequest("a shared-memory region needs a name of 1 to 128 characters")
        if byte_size <= 0:
            raise InvalidRequest(f"region {name!r}: byte_size must be at least 1")
        match = _KEY.fullmatch(key)
        if match is None or match.group(1) in (".", ".."):
            raise InvalidRequest(
                f"region {name!r}: key {key[:80]!r} is not a shared-memory name: '/' then 1 to "
                "255 letters, digits, '.', '_' or '-' (an object in /dev/shm, as shm_open "
                "names it)"
            )
        filename = match.group(1)
        connection = self._connection(client)
        if connection == GONE:
            raise Forbidden(
                "cannot find this call's connection in the kernel's socket table, which "
                "shared-memory regions are tied to; connect over TCP on this device"
            )
        self._drop_stale(client, connection)
        with self._lock:
            self._check_caps_locked(client, name, byte_size)
        fd, writable = self._open(name, key, filename, connection, offset, byte_size)
        region = _Region(name, key, fd, offset, byte_size, writable, connection)
        with self._lock:
            try:  # checked again: racing registrations of this client may have filled it
                self._check_caps_locked(client, name, byte_size)
            except BaseException:
                os.close(fd)
                raise
            regions = self._clients.get(client, {})
            self._clients = {**self._clients, client: {**regions, name: region}}
        log.info(
            "shared memory %r registered by %s: %s [%d, +%d)", name, client, key, offset, byte_size
        )
        self._start_sweeper()

    def _check_caps_locked(self, client: str, name: str, byte_size: int) -> None:
        regions = self._clients.get(client, {})
        if name in regions:
            raise AlreadyExists(
                f"a shared-memory region named {name!r} is registered already; unregister it first"
            )
        if len(regions) >= self.max_regions:
            raise RequestTooLarge(
                f"this client has {len(regions)} shared-memory regions registered, the most "
                "allowed; unregister some first"
            )
        held = sum(r.byte_size for r in regions.values())
        if held + byte_size > self.max_bytes:
            raise RequestTooLarge(
                f"region {name!r}: this client's regions would hold {held + byte_size} "
                f"bytes; at most {self.max_bytes} are allowed"
            )
        if sum(len(r) for r in self._clients.values()) >= self.max_total:
            raise RequestTooLarge(
                f"the server has {self.max_total} shared-memory regions open, the most it "
                "takes; try again later"
            )

    def _connection(self, client: str) -> Connection | None:
        """The client's socket now (see connection_of)."""
        if parse_peer(client) is None:
            return None
        return connection_of(client, socket_entries())

    def _drop_stale(self, client: str, now: Connection | None) -> None:
        """Close the regions registered under the client's address by another socket than
        `now` (a connection gone, its port taken by a new one). `now` None: cannot tell,
        nothing is dropped (no socket table: regions go by the peer address alone)."""
        if now is None:
            return
        regions = self._clients.get(client, {})
        stale = [n for n, r in regions.items() if r.connection is not None and r.connection != now]
        if not stale:
            return
        with self._lock:
            regions = self._clients.get(client, {})
            gone = [r for r in regions.values() if r.connection is not None and r.connection != now]
            kept = {n: r for n, r in regions.items() if r not in gone}
            clients = {c: r for c, r in self._clients.items() if c != client}
            if kept:
                clients[client] = kept
            self._clients = clients
            for region in gone:
                self._close_locked(region)
            self.swept += len(gone)
        if not gone:
            return
        log.info(
            "closed %d shared-memory region(s) of %s: its connection is gone (the address is "
            "another socket's now)",
            len(gone),
            client,
        )

    def unregister(self, client: str, name: str = "") -> None:
        """Close one region of the client's ("" : all of them); an unknown name is no error."""
        self._drop_stale(client, self._connection(client))
        self._unregister(client, name)

    def _unregister(self, client: str, name: str = "") -> None:
        with self._lock:
            regions = self._clients.get(client, {})
            if name:
                gone = [regions[name]] if name in regions else []
                kept = {n: r for n, r in regions.items() if n != name}
            else:
                gone, kept = list(regions.values()), {}
            clients = {c: r for c, r in self._clients.items() if c != client}
            if kept:
                clients[client] = kept
            self._clients = clients
            for region in gone:
                self._close_locked(region)

    def status(self, client: str, name: str = "") -> list[RegionStatus]:
        self._drop_stale(client, self._connection(client))
        regions = self._clients.get(client, {})
        if name:
            region = regions.get(name)
            if region is None:
                raise RegionNotFound(
                    f"no shared-memory region named {name[:128]!r} is registered by this client"
                )
            return [region.status()]
        return [r.status() for r in regions.values()]

    # -- use by requests -----------------------------------------------------------------

    def use(self, client: str) -> SharedMemoryUse:
        return SharedMemoryUse(self, client)

    def _verify(self, client: str) -> None:
        """Drop the client's regions if its socket is not the one that registered them: once
        per request (it reads the kernel's socket table)."""
        if any(r.connection is not None for r in self._clients.get(client, {}).values()):
            self._drop_stale(client, self._connection(client))

    def _acquire(self, client: str, name: str) -> _Region:
        with self._lock:
            region = self._clients.get(client, {}).get(name)
            if region is None or region.closing:
                raise InvalidRequest(
                    f"no shared-memory region named {name[:128]!r} is registered by this "
                    "client (regions belong to the connection that registered them)"
                )
            region.users += 1
            return region

    def _release(self, region: _Region) -> None:
        with self._lock:
            region.users -= 1
            if region.closing and region.users == 0:
                os.close(region.fd)

    def _close_locked(self, region: _Region) -> None:
        if region.closing:
            return
        region.closing = True
        if region.users == 0:
            os.close(region.fd)

    # -- opening, checks ------------------------------------------------------------------

    def _open(
        self,
        name: str,
        key: str,
        filename: str,
        connection: Connection | None,
        offset: int,
        byte_size: int,
    ) -> tuple[int, bool]:
        path = self.root / filename
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | flags)
        except PermissionError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | flags)
            except PermissionError:
                raise Forbidden(
                    f"region {name!r}: this agent may not read the shared-memory object {key!r}"
                ) from None
            except OSError as err:
                raise self._open_error(name, key, err) from None
        except OSError as err:
            raise self._open_error(name, key, err) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequest(f"region {name!r}: {key!r} is not a shared-memory object")
            known = connection is not None and connection != GONE
            owner = connection.uid if connection is not None and known else os.geteuid()
            if not (known and owner == 0) and info.st_uid != owner:
                raise Forbidden(
                    f"region {name!r}: the shared-memory object {key!r} belongs to another user "
                    "than the client's; register only objects your own process created"
                )
            if offset < 0 or offset + byte_size > info.st_size:
                raise InvalidRequest(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} is beyond the "
                    f"end of {key!r} ({info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, writable

    @staticmethod
    def _open_error(name: str, key: str, err: OSError) -> Exception:
        if err.errno == errno.ENOENT:
            return RegionNotFound(
                f"region {name!r}: no shared-memory object {key!r} exists; create it first "
                "(shm_open, tritonclient.utils.shared_memory)"
            )
        if err.errno == errno.ELOOP:
            return Forbidden(f"region {name!r}: {key!r} is a symbolic link, which is refused")
        return InvalidRequest(f"region {name!r}: cannot open {key!r}: {err.strerror}")

    # -- cleaning ----------------------------------------------------------------------

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is not None and self._sweeper.is_alive():
                return
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="edgefleet-shm-sweep", daemon=True
            )
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval_s):
            if not self._clients:
                with self._lock:
                    if not self._clients:
                        self._sweeper = None
                        return
            try:
                self.sweep()
            except Exception:  # the sweeper must not die of one bad read
                log.exception("shared-memory sweep failed")

    def sweep(self) -> int:
        """Close the regions of connections that are gone; how many were closed."""
        table = socket_entries()
        if table is None:
            return 0
        gone = []
        for client, regions in list(self._clients.items()):
            now = connection_of(client, table)
            if now is None:
                continue
            # Gone: no established socket at the address any more, or another one than the
            # socket that registered (its port reused by a new connection).
            if now == GONE or any(
                r.connection is not None and r.connection != now for r in regions.values()
            ):
                gone.append(client)
        closed = 0
        for client in gone:
            count = len(self._clients.get(client, {}))
            self._unregister(client)
            closed += count
            log.info(
                "closed %d shared-memory region(s) of %s: its connection is gone", count, client
            )
        self.swept += closed
        return closed

    def forget(self, client: str) -> None:
        """The client's connection is known to be gone: close its regions now."""
        self._unregister(client)

    def open_regions(self) -> int:
        return sum(len(r) for r in self._clients.values())

    def close(self) -> None:
        """Stop the sweeper and close every region (the server stops)."""
        self._stop.set()
        with self._lock:
            clients, self._clients = self._clients, {}
            for regions in clients.values():
                for region in regions.values():
                    self._close_locked(region)


class SharedMemoryUse:
    """One request's use of its client's regions: each region it touches stays open until
    :meth:`close`, even if unregistered meanwhile."""

    def __init__(self, regions: SharedMemoryRegions, client: str) -> None:
        self._regions = regions
        self._client = client
        self._held: dict[str, _Region] = {}
        self._verified = False

    def _region(self, name: str) -> _Region:
        region = self._held.get(name)
        if region is None:
            if not self._verified:
                self._regions._verify(self._client)
                self._verified = True
            region = self._held[name] = self._regions._acquire(self._client, name)
        return region

    @staticmethod
    def _check(region: _Region, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidRequest(
                f"shared memory offset {offset} + byte_size {size} is beyond region "
                f"{region.name!r} ({region.byte_size} bytes)"
            )

    def read(self, name: str, offset: int, size: int) -> bytearray:
        region = self._region(name)
        self._check(region, offset, size)
        buffer = bytearray(size)
        got = os.preadv(region.fd, [buffer], region.offset + offset) if size else 0
        if got != size:
            raise InvalidRequest(
                f"region {name!r} holds fewer bytes than registered (its object {region.key!r} "
                "shrank); register it again"
            )
        return buffer

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        region = self._region(name)
        self._check(region, offset, len(data))
        if not region.writable:
            raise Forbidden(f"region {name!r}: this agent may only read {region.key!r}")
        view = memoryview(data)
        at = region.offset + offset
        while view:
            written = os.pwrite(region.fd, view, at)
            if written <= 0:
                raise InvalidRequest(f"region {name!r}: could not write the output")
            view = view[written:]
            at += written
        # A write past a shrunk file's end grows it again: harmless, and nothing is mapped.

    def close(self) -> None:
        held, self._held = self._held, {}
        for region in held.values():
            self._regions._release(region)


@contextlib.contextmanager
def using(regions: SharedMemoryRegions, client: str) -> Iterator[SharedMemoryUse]:
    use = regions.use(client)
    try:
        yield use
    finally:
        use.close()
