"""A user-space TCP proxy that adds one-way latency (and optionally a rate, or corruption) per direction.

This kernel has no ``tc netem``, so latency is emulated in user space: every chunk read from one side
is stamped with ``now + delay`` and written to the other side when that time comes. Reading and
writing are separate tasks, so the link is a pipe of ``delay`` length, not stop-and-wait: throughput is
what a real long link gives (bounded by the buffer, like a TCP window), and a request/response pays
``up_delay + down_delay`` per round trip.

Run it inside a lab namespace, in front of a service::

    nsenter --net=/run/netns/NS python -m remora_testing.netlab.delay \\
        --listen 10.213.7.5:6000 --upstream 10.213.7.5:5000 --delay-ms 20 --rate 50mbit

Clients then use :6000 and see +40 ms RTT. ``--rate`` shapes each direction with a token bucket, for
links where a qdisc is not at hand; ``--corrupt`` makes the service behind it look like a peer that
returns wrong bytes (fault injection for the mesh tests). With ``--tls-dir`` (a member's ca.pem,
cert.pem, key.pem) the proxy terminates mutual TLS on both sides with that certificate, so that a
corrupting proxy in a TLS mesh is a lying cluster MEMBER (what TLS cannot prevent and piece digests
must catch), not a broken TLS stream.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
import time

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
#: ``--corrupt`` flips the last byte of every downstream read of at least this size: HTTP headers are
#: smaller and come in reads of their own, so it is the body (piece data) that arrives wrong.
CORRUPT_MIN_CHUNK = 4096


class _Pipe:
    """One direction: a reader stamps chunks with their due time, a writer delivers them when due."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                 rate_bytes: float | None, max_buffer: int, corrupt: bool = False):
        self.reader, self.writer = reader, writer
        self.corrupt = corrupt
        self.delay, self.rate, self.max_buffer = delay, rate_bytes, max_buffer
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.moved = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.eof = False
        self.broken = False
        self.corrupted = 0

    async def read_side(self) -> None:
        try:
            while not self.broken:
                await self.has_room.wait()
                data = await self.reader.read(CHUNK)
                if not data or self.broken:
                    break
                if self.corrupt and len(data) >= CORRUPT_MIN_CHUNK:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                    self.corrupted += 1
                self.queue.append((time.monotonic() + self.delay, data))
                self.buffered += len(data)
                if self.buffered >= self.max_buffer:
                    self.has_room.clear()
                self.has_data.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.has_data.set()

    async def write_side(self) -> None:
        budget_t = time.monotonic()  # token bucket: time at which the bytes sent so far are "paid"
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.has_data.clear()
                    await self.has_data.wait()
                    continue
                due, data = self.queue.popleft()
                self.buffered -= len(data)
                if self.buffered < self.max_buffer:
                    self.has_room.set()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.rate:
                    budget_t = max(budget_t, time.monotonic()) + len(data) / self.rate
                    wait = budget_t - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                self.writer.write(data)
                await self.writer.drain()
                self.moved += len(data)
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            # the receiving side is gone: stop reading too, or a full buffer would block the reader forever
            self.broken = True
            self.has_room.set()


class DelayProxy:
    """Accept on ``listen``, connect each client to ``upstream``, delay both directions."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], up_delay: float = 0.0,
                 down_delay: float = 0.0, rate_bytes: float | None = None, max_buffer: int = 4 << 20,
                 corrupt: bool = False, tls_dir: str | None = None):
        if up_delay < 0 or down_delay < 0:
            raise ValueError("delays must be >= 0")
        self.listen, self.upstream = listen, upstream
        self.up_delay, self.down_delay = up_delay, down_delay
        self.rate_bytes, self.max_buffer = rate_bytes, max_buffer
        self.corrupt = corrupt
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.server_ssl = self.client_ssl = None
        if tls_dir:
            from remora.pki import tls

            material = tls.load_material(tls.TLSFiles.in_dir(tls_dir))
            self.server_ssl = tls.server_context(material)
            self.client_ssl = tls.client_context(material, check_hostname=False)

    async def start(self) -> DelayProxy:
        self.server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], ssl=self.server_ssl)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream, ssl=self.client_ssl)
        except OSError as exc:
            log.warning("upstream %s:%d unreachable: %s", *self.upstream, exc)
            c_writer.close()
            return
        up = _Pipe(c_reader, u_writer, self.up_delay, self.rate_bytes, self.max_buffer)
        down = _Pipe(u_reader, c_writer, self.down_delay, self.rate_bytes, self.max_buffer, self.corrupt)
        try:
            await asyncio.gather(up.read_side(), up.write_side(), down.read_side(), down.write_side())
        finally:
            for w in (u_writer, c_writer):
                w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m remora_testing.netlab.delay",
        description="TCP proxy adding one-way latency per direction (user-space stand-in for netem delay).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m remora_testing.netlab.delay --listen 10.213.7.5:6000 --upstream 10.213.7.5:5000 "
               "--delay-ms 20\n  (clients of :6000 see 40 ms more round-trip time)",
    )
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to accept on (PORT 0 = any)")
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay for both directions")
    p.add_argument("--up-delay-ms", type=float, help="client->upstream delay (overrides --delay-ms)")
    p.add_argument("--down-delay-ms", type=float, help="upstream->client delay (overrides --delay-ms)")
    p.add_argument("--rate", help="per-direction rate limit, e.g. 20mbit (default: none)")
    p.add_argument("--corrupt", action="store_true",
                   help="fault injection: flip the last byte of every large upstream->client read "
                        "(a peer that serves corrupt piece data)")
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="terminate mutual TLS on both sides with DIR/ca.pem, cert.pem, key.pem (a mesh member)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from remora_testing.netlab.shaping import parse_rate
    rate = parse_rate(args.rate) / 8 if args.rate else None
    up = (args.delay_ms if args.up_delay_ms is None else args.up_delay_ms) / 1000
    down = (args.delay_ms if args.down_delay_ms is None else args.down_delay_ms) / 1000
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        proxy = await DelayProxy(args.listen, args.upstream, up, down, rate, corrupt=args.corrupt,
                                 tls_dir=args.tls_dir).start()
        print(f"listening {args.listen[0]}:{proxy.port} -> {args.upstream[0]}:{args.upstream[1]} "
              f"delay up {up * 1000:.1f} ms down {down * 1000:.1f} ms", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
