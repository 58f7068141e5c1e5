"""The connection sidecar: a per-pod egress proxy."""

from sidecar._build import check_source_tree

__version__ = "0.1.0"

check_source_tree()
