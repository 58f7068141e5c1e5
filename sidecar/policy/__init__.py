"""Resilience policies as small synchronous state machines on an injected clock."""
