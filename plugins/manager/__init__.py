"""remora manager: the control plane of a remora cluster.

Clusters with scopes, scheduler / seed-peer / peer membership with keepalives, versioned dynamic
config, preheat and maintenance jobs fanned out to peers, users + personal access tokens + an audit
log, a REST API with an OpenAPI document and a small web console. See docs/manager.md.
"""
