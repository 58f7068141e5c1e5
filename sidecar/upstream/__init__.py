"""Facing the network: clusters, balancers, pools, connections, TLS origination."""
