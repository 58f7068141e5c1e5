"""The side-by-side benchmark of the sidecar against direct nginx, Envoy and pproxy."""
