"""The keep-alive governance settings (``keep_alive_min``, ``keep_alive_max``,
``client_keep_alive``), the same three at the top level, per model and per API key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, field_validator, model_validator

from residency.errors import InvalidArgumentError
from residency.keepalive import ClientKeepAlive, KeepAliveRule

__all__ = ["KeepAliveLimits"]


class KeepAliveLimits(BaseModel):
    """What clients' keep_alive may do; unset fields defer to the level above (key → model →
    server)."""

    #: No client keep_alive shorter than this ("30m", seconds, "-1"); None = no lower bound.
    keep_alive_min: str | None = None
    #: No client keep_alive longer than this; None = no upper bound.
    keep_alive_max: str | None = None
    #: "clamp" (into [min, max]; the default), "honour" (as sent) or "ignore" (the default
    #: keep-alive applies). None = the level above's (at the top: "clamp").
    client_keep_alive: ClientKeepAlive | None = None

    @field_validator("keep_alive_min", "keep_alive_max", mode="before")
    @classmethod
    def _bound_text(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and not value.strip():
            return None  # RESIDENCY_KEEP_ALIVE_MAX= (set but empty): not set
        return value

    @model_validator(mode="after")
    def _bounds_valid(self) -> Any:
        self.keep_alive_rule()
        return self

    def keep_alive_rule(self) -> KeepAliveRule:
        """These limits parsed (raises ValueError naming the setting)."""
        try:
            return KeepAliveRule.parse(
                self.client_keep_alive, self.keep_alive_min, self.keep_alive_max
            )
        except InvalidArgumentError as err:
            raise ValueError(str(err)) from None
