"""A network lab of real namespaces for end-to-end tests and benchmarks of the P2P mesh.

- :mod:`~remora_testing.netlab.namespaces`: :class:`Lab` (bridge namespace, one namespace per node, veth pairs,
  addresses in a random /24 of 10.213.0.0/16 blackholed in the root namespace first), ``run_in`` /
  ``spawn_in`` (nsenter), :func:`cleanup_stale` for what a killed run left.
- :mod:`~remora_testing.netlab.shaping`: tbf/htb rate limits per link direction.
- :mod:`~remora_testing.netlab.delay`: user-space TCP latency proxy (the kernel has no netem).
- :mod:`~remora_testing.netlab.probe`: small clients run inside namespaces (fetch + digest, byte sink/source).

``python -m remora_testing.netlab cleanup`` removes stale labs.
"""
from remora_testing.netlab.namespaces import (
                                      DEFAULT_PREFIX,
                                      LAB_SUPERNET,
                                      Lab,
                                      NetlabError,
                                      Node,
                                      cleanup_stale,
                                      run_in,
                                      spawn_in,
)

__all__ = ["Lab", "Node", "NetlabError", "run_in", "spawn_in", "cleanup_stale", "LAB_SUPERNET",
           "DEFAULT_PREFIX"]
