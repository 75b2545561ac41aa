"""`remora peer` and `remora scheduler`: P2P blob distribution as a containerd registry mirror."""
