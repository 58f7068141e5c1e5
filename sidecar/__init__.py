"""The connection sidecar: a per-pod egress proxy."""

__version__ = "0.1.0"
