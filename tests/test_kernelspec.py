"""Kernelspecs: the kernel.json dict (exact), installing one, and `cellblock install`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from cellblock.kernelspec import (
    install_all,
    install_kernelspec,
    kernel_name,
    kernelspec_argv,
    kernelspec_dict,
    write_kernelspec,
)
from cellblock.policy import Profile, load_policy

BIN = Path(sys.executable).parent


def _agent_dict() -> dict[str, object]:
    return {
        "argv": ["cellblock-provisioner-required", "-f", "{connection_file}"],
        "display_name": "Python (cellblock: agent)",
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": "cellblock-provisioner",
                "config": {"profile": "agent"},
            },
            "cellblock": {"profile": "agent", "description": "For agents."},
        },
    }


def test_kernel_name() -> None:
    assert kernel_name("agent") == "cellblock-agent"


def test_argv_is_not_a_runnable_kernel() -> None:
    assert kernelspec_argv() == ["cellblock-provisioner-required", "-f", "{connection_file}"]


def test_kernelspec_dict_exact() -> None:
    profile = Profile(display_name="Python (cellblock: agent)", description="For agents.")
    assert kernelspec_dict("agent", profile) == _agent_dict()


def test_kernelspec_dict_default_display_name() -> None:
    spec = kernelspec_dict("ci", Profile())
    assert spec["display_name"] == "Python (cellblock: ci)"
    assert spec["metadata"]["kernel_provisioner"]["config"] == {"profile": "ci"}


def test_write_kernelspec(tmp_path: Path) -> None:
    profile = Profile(display_name="Python (cellblock: agent)", description="For agents.")
    out = write_kernelspec(tmp_path / "k", "agent", profile)
    assert out == tmp_path / "k"
    assert sorted(p.name for p in out.iterdir()) == ["kernel.json"]
    assert json.loads((out / "kernel.json").read_text()) == _agent_dict()


def test_install_kernelspec_with_prefix(tmp_path: Path) -> None:
    profile = Profile(display_name="Python (cellblock: agent)", description="For agents.")
    installed = install_kernelspec("agent", profile, prefix=str(tmp_path))
    kernels = tmp_path / "share" / "jupyter" / "kernels"
    assert Path(installed) == kernels / "cellblock-agent"
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert ksm.find_kernel_specs() == {"cellblock-agent": str(kernels / "cellblock-agent")}
    spec = ksm.get_kernel_spec("cellblock-agent")
    expected = _agent_dict()
    assert {key: getattr(spec, key) for key in expected} == expected

def test_install_all_one_per_profile(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("[profiles.ci]\n")
    paths = install_all(load_policy(policy_file), prefix=str(tmp_path / "prefix"))
    assert [Path(p).name for p in paths] == ["cellblock-agent", "cellblock-analyst", "cellblock-ci"]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELLBLOCK_", "JUPYTER_"))}
    empty = tmp_path / "empty-policy.toml"
    empty.write_text("")
    env.update(CELLBLOCK_POLICY=str(empty), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PLATFORM_DIRS="1")
    return env


def test_cellblock_install_prefix_then_kernelspec_list(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    prefix = tmp_path / "prefix"
    out = subprocess.run([str(BIN / "cellblock"), "install", "--prefix", str(prefix)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kernels = prefix / "share" / "jupyter" / "kernels"
    assert out.stdout.splitlines() == [
        f"installed cellblock-agent in {kernels / 'cellblock-agent'}",
        f"installed cellblock-analyst in {kernels / 'cellblock-analyst'}",
    ]
    env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    listed = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"],
                            capture_output=True, text=True, env=env, timeout=60, check=True)
    specs = json.loads(listed.stdout)["kernelspecs"]
    for name in ("agent", "analyst"):
        entry = specs[f"cellblock-{name}"]
        assert entry["resource_dir"] == str(kernels / f"cellblock-{name}")
        assert entry["spec"]["display_name"] == f"Python (cellblock: {name})"
        assert entry["spec"]["interrupt_mode"] == "message"
        assert entry["spec"]["metadata"]["kernel_provisioner"] == {
            "provisioner_name": "cellblock-provisioner", "config": {"profile": name}}
