"""Observation: plain counters on the data path (stats), exported by prometheus-client (metrics)."""
