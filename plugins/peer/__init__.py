"""``remora peer``: the per-node P2P daemon, a pull-through OCI registry mirror backed by a piece mesh.

containerd (through hosts.toml) and the snapshotter's lazy range reads talk to the mirror API
(:mod:`.mirror`); blobs are cut into pieces kept on disk (:mod:`.pieces`) and fetched either from other
peers the scheduler picks or from the registry (:mod:`.download`); other peers fetch our verified pieces
from the upload API (:mod:`.upload`). Start it with :class:`.daemon.PeerDaemon` or ``remora peer``.
"""
