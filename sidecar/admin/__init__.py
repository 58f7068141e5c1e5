"""The admin (loopback) and status (kubelet, Prometheus) HTTP servers, on aiohttp."""

from sidecar.admin.server import AdminHooks, AdminServer, ReadinessHooks, StatusServer

__all__ = ["AdminHooks", "AdminServer", "ReadinessHooks", "StatusServer"]
