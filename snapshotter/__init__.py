"""`remora snapshotter`: a containerd remote snapshotter with lazy FUSE mounts."""
