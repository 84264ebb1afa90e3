"""The launch request: built once by the provisioner (or the warm pool), carried as one
JSON line through the spawner to the warden, and validated on arrival.

Who calls it: :class:`cellblock.provisioner.CellblockProvisioner` (``launch``),
:func:`cellblock.warden.client.warm` (``pool``), the spawner (pooled launches, and parsing
every request it reads), and the warden's life (:mod:`cellblock.warden.life`).

``datasets`` is the launch's final selection, resolved once from ``$CELLBLOCK_DATASETS``
and the profile's ``default_datasets`` by the caller (:func:`cellblock.datasets.
select_datasets`): a tuple of names, empty for none. The warden checks it against the
profile again (the policy may have changed since), never parses it again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..names import DATASET_NAME, check_kernel_id

__all__ = ["LaunchRequest", "ValidationError"]


class LaunchRequest(BaseModel):
    """One request to the spawner (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Literal["launch", "pool"] = "launch"
    profile: str = Field(min_length=1, max_length=200)
    env: dict[str, str] = Field(description="the environment the warden runs with")
    kernel_id: str = Field("", description="launch: the kernel id (or a pool slot)")
    client_conn: dict[str, Any] | None = Field(
        None, description="launch: the client's connection info (ports, key); None pooled")
    datasets: tuple[str, ...] = Field((), description="launch: the datasets granted")
    pooled: bool = Field(False, description="a kernel started for the warm pool")
    size: int | None = Field(None, ge=0, description="pool: the pool's size")
    reset_failures: bool = Field(False, description="pool: try again after failures")

    @field_validator("kernel_id")
    @classmethod
    def _kernel_id(cls, value: str) -> str:
        return check_kernel_id(value) if value else value

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not DATASET_NAME.fullmatch(name):
                raise ValueError(f"dataset name {name!r} is not a dataset name")
        if len(set(value)) != len(value):
            raise ValueError(f"datasets {value!r} name one dataset twice")
        return value

    def line(self) -> bytes:
        """The request as one JSON line."""
        return self.model_dump_json().encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> LaunchRequest:
        """A request from one JSON line; ValueError (pydantic's, naming the field)."""
        return cls.model_validate_json(line)
