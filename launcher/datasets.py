"""Datasets in the policy, and which of them a launch is granted.

The policy names datasets at its top level (``[datasets.NAME]``: a host path to a
file or a directory, and a description). A profile lists which of them it allows
(``datasets``) and which a launch gets when it asks for none (``default_datasets``).
A launch asks with the kernel environment variable ``CELLBLOCK_DATASETS``
(comma-separated names), which Jupyter Server's REST API and jupyter_client both
pass in ``env``; the provisioner resolves it here and hands the result to the
warden on its command line, never through the jail's environment.

Everything in this module is pure: policy and text in, names out. Opening the
datasets is the broker's job (:mod:`cellblock.broker`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import PolicyError

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["DATASETS_ENV", "Dataset", "check_profiles", "parse_selection", "select_datasets"]

DATASETS_ENV = "CELLBLOCK_DATASETS"
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,39}$"  # the same as cellblock_kernel.datasets.NAME_RE


class Dataset(BaseModel):
    """One dataset: ``[datasets.NAME]`` in the policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="absolute host path of a file or a directory")
    description: str = Field("", max_length=200, description="shown by datasets.list()")

    @field_validator("path")
    @classmethod
    def _absolute_plain_path(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError("must be an absolute path")
        if ":" in value or "\0" in value or "\n" in value:
            raise ValueError("must not contain ':' (nsjail's separator), NUL or a newline")
        if os.path.normpath(value) != value or value == "/":
            raise ValueError("must be a normalised path (no '.', '..', '//' or trailing '/') "
                             "below /")
        return value

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be one line")
        return value


def check_profiles(policy: Policy) -> list[str]:
    """Problems with the profiles' dataset lists, one line each, each naming its key."""
    problems = []
    known = ", ".join(sorted(policy.datasets)) or "(none defined)"
    for pname, profile in sorted(policy.profiles.items()):
        for key in ("datasets", "default_datasets"):
            for name in getattr(profile, key):
                if name not in policy.datasets:
                    problems.append(f"profiles.{pname}.{key}: unknown dataset {name!r}; "
                                    f"datasets defined: {known}")
        extra = [n for n in profile.default_datasets if n not in profile.datasets]
        if extra:
            problems.append(f"profiles.{pname}.default_datasets: {', '.join(map(repr, extra))} "
                            f"not in profiles.{pname}.datasets (a default must be allowed)")
    return problems


def parse_selection(text: str) -> tuple[str, ...]:
    """``"sales, weather"`` -> ``("sales", "weather")``; duplicates dropped, order kept."""
    out: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name and name not in out:
            out.append(name)
    return tuple(out)


def check_grants(policy: Policy, profile_name: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` (a launch's final selection) if the profile allows every one of them now;
    else :class:`PolicyError` naming the dataset, the profile and what it allows."""
    profile = policy.profile(profile_name)
    allowed = ", ".join(profile.datasets) or "none"
    for name in names:
        if name not in profile.datasets or name not in policy.datasets:
            raise PolicyError(f"dataset {name!r} is not allowed by profile {profile_name!r}; "
                              f"it allows: {allowed}")
    return names


def select_datasets(policy: Policy, profile_name: str, requested: str | None) -> tuple[str, ...]:
    """The datasets one launch is granted.

    ``requested`` is the value of ``CELLBLOCK_DATASETS`` (None or blank: the profile's
    ``default_datasets``). Every requested name must be in the profile's ``datasets``;
    otherwise :class:`PolicyError` names the dataset, the profile and what it allows.
    """
    profile = policy.profile(profile_name)
    chosen = parse_selection(requested or "")
    if not chosen:
        return tuple(profile.default_datasets)
    allowed = ", ".join(profile.datasets) or "none"
    for name in chosen:
        if name not in profile.datasets or name not in policy.datasets:
            raise PolicyError(
                f"dataset {name!r} (from ${DATASETS_ENV}) is not allowed by profile "
                f"{profile_name!r}; it allows: {allowed}"
            )
    return chosen
