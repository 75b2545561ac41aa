"""Rate limits on lab links with ``tbf`` or ``htb`` (this kernel has no ``netem``).

A qdisc shapes what leaves an interface, so one direction of a link is shaped on the interface that
sends it: a node's uplink on its ``eth0`` (inside the node namespace), its downlink on its bridge port
(inside the bridge namespace). :meth:`remora_testing.netlab.namespaces.Node.shape` picks the right one.

Rates are given like tc takes them ("100mbit", "20mbit", "512kbit") or as an int in bits/s.
"""
from __future__ import annotations

import re

from remora.errors import UsageError
from remora_testing.netlab.namespaces import _run

#: The largest packet tbf may be handed whole when the sender's TCP segmentation offload is kept: a 64 KiB
#: GSO super-packet as the qdisc counts it (its length plus the headers of every segment it stands for,
#: ~68.5 KB), with room to spare.
GSO_BURST = 128 * 1024
_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
MTU_FRAME = 1514


def parse_rate(rate: str | int) -> int:
    """Bits per second from ``"100mbit"`` / ``"12.5mbps"`` (bytes) / ``100_000_000``."""
    if isinstance(rate, int):
        bits = rate
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(rate))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"rate {rate!r}: use a number with bit, kbit, mbit, gbit (bits) or kbps, mbps (bytes)")
        bits = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if bits <= 0:
        raise UsageError(f"rate {rate!r} must be positive")
    return bits


def tbf_burst(bits_per_s: int, gso: bool = False) -> int:
    """Bucket size in bytes: 5 ms of traffic, at least 16 full frames (and with ``gso``, at least
    :data:`GSO_BURST`).

    Too small a bucket and tbf cannot reach its rate (the timer tick refills too little per tick); too
    large and short transfers run at line speed. 5 ms is several ticks even at HZ=250.

    A packet larger than the bucket cannot pass whole, so tbf cuts every TCP super-packet (GSO, up to
    64 KiB) back into MTU frames in software, and every frame then crosses the veths, the bridge, the
    other shaper and the receiving TCP stack on its own: on a small machine that per-frame work, not
    the link, limits a lab with many busy links. ``gso=True`` makes the bucket hold a whole
    super-packet, which is what a real NIC with TSO and GRO carries per interrupt; the average rate
    is the same, bursts at line speed grow to 128 KiB (10 ms at 100 Mbit/s).
    """
    burst = max(16 * MTU_FRAME, bits_per_s // 8 // 200)
    return max(burst, GSO_BURST) if gso else burst


def set_rate(ns: str, dev: str, rate: str | int, kind: str = "tbf", latency_ms: int = 50,
             gso: bool = False) -> None:
    """Replace the root qdisc of ``dev`` in ``ns`` with a shaper at ``rate``.

    ``tbf``: one token bucket, queue bounded by ``latency_ms``. ``htb``: one class as the default, same
    rate and ceil; useful when classes per destination are added later. ``gso``: see :func:`tbf_burst`.
    """
    bits = parse_rate(rate)
    burst = tbf_burst(bits, gso)
    clear_rate(ns, dev)
    if kind == "tbf":
        ip_tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bits}bit",
              "burst", str(burst), "latency", f"{latency_ms}ms")
    elif kind == "htb":
        ip_tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        ip_tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
              "rate", f"{bits}bit", "ceil", f"{bits}bit", "burst", str(burst))
    else:
        raise UsageError(f"shaper {kind!r}: use 'tbf' or 'htb'")


def clear_rate(ns: str, dev: str) -> None:
    """Back to the default qdisc (no limit); no error when there was none."""
    ip_tc(ns, "qdisc", "del", "dev", dev, "root", check=False)


def show(ns: str, dev: str) -> str:
    return ip_tc(ns, "-s", "qdisc", "show", "dev", dev).stdout


def ip_tc(ns: str, *args: str, check: bool = True):
    """``tc`` inside ``ns`` (``tc -n`` changes nothing outside the namespace)."""
    return _run(["tc", "-n", ns] + list(args), check=check)


__all__ = ["parse_rate", "set_rate", "clear_rate", "show", "tbf_burst", "GSO_BURST"]
