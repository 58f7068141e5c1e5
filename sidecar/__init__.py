"""The connection sidecar: a per-pod egress proxy."""

import os

from sidecar._build import check_source_tree, use_sources

__version__ = "0.1.0"

if os.environ.get("SIDECAR_PURE") == "1":
    use_sources()  # the .py files, even where compiled modules exist (tests of that build)
else:
    check_source_tree()  # compiled modules only if built from these sources, else the .py files
