"""remora: lazy-loading container images, a containerd remote snapshotter and P2P blob distribution."""

__version__ = "0.1.0"
