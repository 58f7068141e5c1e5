"""End-to-end tests: the chart's rendered objects driving the real sidecar (see README.md)."""
