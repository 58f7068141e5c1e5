"""What every model shares: frozen, unknown keys refused; helpers for derived defaults."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from sidecar.config.addresses import split_address


def _default_when_absent(data: Any, field: str, compute: Callable[[Mapping[str, Any]], Any]) -> Any:
    """Derive a default from a sibling the user did set, so that `max_connections: 10` alone
    is not an error about `max_idle: 20`, a key the user never wrote."""
    if isinstance(data, Mapping) and field not in data:
        try:
            value = compute(data)
        except (KeyError, TypeError, ValueError):
            return data  # the sibling is absent or invalid: pydantic will say so
        if value is not None:
            return {**data, field: value}
    return data


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Bound:
    """`host` and `port` of a model's `address` field (a mixin, so field order stays as in YAML)."""

    if TYPE_CHECKING:
        address: str

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


_TRUE = {"1", "on", "t", "true", "y", "yes"}  # what pydantic's lax bool accepts as True


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in _TRUE)


def _mappings(value: object) -> list[tuple[int, Mapping[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, Mapping)]
