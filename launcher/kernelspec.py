"""Kernelspecs, one per profile, installed through small pure steps (as ipykernel does):
argv -> kernel.json dict -> files in a directory -> installed with jupyter_client.

``cellblock-agent``'s kernel.json names the provisioner and the profile::

    {"argv": [...], "display_name": "Python (cellblock: agent)", "language": "python",
     "interrupt_mode": "message",
     "metadata": {"kernel_provisioner": {"provisioner_name": "cellblock-provisioner",
                                          "config": {"profile": "agent"}}}}

The argv is never run by the provisioner (it starts a warden instead); it is what
a tool that ignores provisioners would see, and it names cellblock_kernel so such
a tool fails loudly instead of running an unjailed kernel.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .policy import Policy, Profile

__all__ = [
    "install_all",
    "install_kernelspec",
    "kernel_name",
    "kernelspec_argv",
    "kernelspec_dict",
    "write_kernelspec",
]

PROVISIONER_NAME = "cellblock-provisioner"


def kernel_name(profile_name: str) -> str:
    """The kernelspec name of a profile: ``cellblock-<profile>``."""
    return f"cellblock-{profile_name}"


def kernelspec_argv() -> list[str]:
    """An argv that is not a kernel: only a provisioner-aware client can start the spec."""
    return ["cellblock-provisioner-required", "-f", "{connection_file}"]


def kernelspec_dict(profile_name: str, profile: Profile) -> dict[str, Any]:
    """The kernel.json of one profile (see the module docstring)."""
    return {
        "argv": kernelspec_argv(),
        "display_name": profile.display_name or f"Python (cellblock: {profile_name})",
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"profile": profile_name},
            },
            "cellblock": {"profile": profile_name, "description": profile.description},
        },
    }


def write_kernelspec(directory: Path, profile_name: str, profile: Profile) -> Path:
    """Write ``directory/kernel.json`` (making the directory); returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(
        json.dumps(kernelspec_dict(profile_name, profile), indent=1) + "\n"
    )
    return directory


def install_kernelspec(
    profile_name: str,
    profile: Profile,
    *,
    user: bool = False,
    prefix: str | None = None,
    ksm: KernelSpecManager | None = None,
) -> str:
    """Install ``cellblock-<profile_name>``; returns the installed directory."""
    ksm = ksm or KernelSpecManager()
    with tempfile.TemporaryDirectory() as tmp:
        src = write_kernelspec(Path(tmp) / kernel_name(profile_name), profile_name, profile)
        return str(ksm.install_kernel_spec(
            str(src), kernel_name(profile_name), user=user, prefix=prefix
        ))


def install_all(policy: Policy, *, user: bool = False, prefix: str | None = None) -> list[str]:
    """One kernelspec per profile of the resolved policy."""
    return [
        install_kernelspec(name, prof, user=user, prefix=prefix)
        for name, prof in sorted(policy.profiles.items())
    ]
