"""`remora scheduler`: the P2P control plane.

Peers register with a scheduler, announce the pieces of a blob they hold (or are fetching) and ask it for
parents. The scheduler elects the first peer of a task as the seed (it goes back to the registry) and hands
the others the best few parents: filtered by :mod:`.selection`, scored by the weighted scorer or the UCB
bandit of :mod:`.bandit`. Tasks are spread over several schedulers by consistent hashing (:mod:`.ring`);
:mod:`.client` is the failover client the peer daemon uses. See docs/p2p.md.
"""
