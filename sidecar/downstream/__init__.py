"""Facing the app: listeners, the HTTP protocol, exchanges, routing, tunnels."""
