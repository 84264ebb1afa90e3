"""The `cellblock` command through a real subprocess: exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellblock.cli import format_command, one_line
from cellblock.notebook_run import CellEffect, RunSummary, printable
from cellblock.run_result import PolicyReport

BIN = Path(sys.executable).parent


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without cellblock or Jupyter settings, and an empty
    operator policy so a cellblock.toml elsewhere on this host cannot change results."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELLBLOCK_", "JUPYTER_"))}
    empty = tmp_path / "empty-policy.toml"
    empty.write_text("")
    clean.update(CELLBLOCK_POLICY=str(empty), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
                 JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PLATFORM_DIRS="1")
    return clean


def cellblock(env: dict[str, str], *args: str, cwd: Path | None = None):
    return subprocess.run([str(BIN / "cellblock"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120, check=False)


def assert_bad_input(out: subprocess.CompletedProcess[str], *parts: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr holding every part, no traceback."""
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("cellblock: ")
    for part in parts:
        assert part in lines[0]


# -- format_command and one_line (pure) ---------------------------------------------------

def test_format_command_pairs_flags_with_values() -> None:
    argv = ["/usr/bin/nsjail", "--config", "/c/base.cfg", "--user", "1000:1073741824:1",
            "--mount", "none:/tmp:tmpfs:size=1,mode=1777", "--quiet", "--bindmount_ro",
            "/a b", "--", "/p/python", "-m", "cellblock_kernel", "--transport=ipc"]
    assert format_command(argv) == (
        "/usr/bin/nsjail \\\n"
        "    --config /c/base.cfg \\\n"
        "    --user 1000:1073741824:1 \\\n"
        "    --mount none:/tmp:tmpfs:size=1,mode=1777 \\\n"
        "    --quiet \\\n"
        "    --bindmount_ro '/a b' \\\n"
        "    -- /p/python -m cellblock_kernel --transport=ipc"
    )


@pytest.mark.parametrize(("argv", "text"), [
    ([], ""),
    (["nsjail"], "nsjail"),
    (["nsjail", "--flag"], "nsjail \\\n    --flag"),
    (["nsjail", "--a", "--b", "x"], "nsjail \\\n    --a \\\n    --b x"),
    (["nsjail", "--"], "nsjail \\\n    --"),
])
def test_format_command_edges(argv: list[str], text: str) -> None:
    assert format_command(argv) == text


@pytest.mark.parametrize(("message", "line"), [
    ("one", "one"),
    ("", ""),
    ("invalid policy (x):\n  a: bad\n  b: worse", "invalid policy (x): a: bad | b: worse"),
])
def test_one_line(message: str, line: str) -> None:
    assert one_line(message) == line


# -- profiles -----------------------------------------------------------------------------

def test_profiles_list(env: dict[str, str]) -> None:
    out = cellblock(env, "profiles", "list")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()[:-1]]
    assert names == ["agent", "analyst"]
    assert out.stdout.splitlines()[-1] == f"(policy from: builtin + {env['CELLBLOCK_POLICY']})"


def test_profiles_show_one_flag_and_value_per_line(env: dict[str, str]) -> None:
    out = cellblock(env, "profiles", "show", "agent")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  limits.memory = 1073741824" in lines
    start = lines.index("nsjail command (run dir and uid are chosen per kernel):")
    command = lines[start + 1:]
    assert command[0].endswith("nsjail \\")
    assert "    --user 1000:1073741824:1 \\" in command
    assert "    --group 1000:1073741824:1 \\" in command
    assert "    --rlimit_nofile 1024 \\" in command
    assert "    --rlimit_fsize 256 \\" in command
    assert command[-1].startswith("    -- ")
    assert command[-1].endswith(" -m cellblock_kernel -f /run/cellblock/kernel.json "
                                "--transport=ipc --ip=/run/cellblock/k "
                                "--CellblockKernelApp.image_max_side=1568 "
                                "--CellblockKernelApp.image_max_pixels=1150000 "
                                "--CellblockKernelApp.image_max_bytes=307200")
    for line in command[1:-1]:  # every middle line is one flag, maybe with its value
        assert line.startswith("    --") and line.endswith(" \\")
        assert len(line.split()) in (2, 3)


def test_profiles_show_json_matches_text(env: dict[str, str]) -> None:
    out = cellblock(env, "profiles", "show", "analyst", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["profile"] == "analyst"
    assert shown["settings"]["limits"]["memory"] == 4 * 1024**3
    argv = shown["nsjail_command"]
    assert argv[argv.index("--rlimit_nofile") + 1] == "4096"
    assert len(shown["policy_sha256"]) == 64


def test_profiles_show_unknown(env: dict[str, str]) -> None:
    out = cellblock(env, "profiles", "show", "nope")
    assert_bad_input(out, "unknown profile 'nope'", "known profiles: agent, analyst")
    assert out.stdout == ""


def test_profiles_show_reflects_operator_file(env: dict[str, str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[profiles.agent.limits]\nopen_files = 300\n')
    out = cellblock({**env, "CELLBLOCK_POLICY": str(policy)}, "profiles", "show", "agent")
    assert out.returncode == 0, out.stderr
    assert f"(policy: builtin + {policy}, sha256 " in out.stdout
    assert "  limits.open_files = 300" in out.stdout.splitlines()
    assert "    --rlimit_nofile 300 \\" in out.stdout.splitlines()


# -- bad input: exit 2 with one line ---------------------------------------------------------

def test_doctor_unknown_profile(env: dict[str, str]) -> None:
    out = cellblock(env, "doctor", "agent", "nope")
    assert_bad_input(out, "unknown profile 'nope'", "known profiles: agent, analyst")
    assert out.stdout == ""  # refused before any check ran


def test_run_unknown_profile(env: dict[str, str], tmp_path: Path) -> None:
    nb = tmp_path / "nb.ipynb"
    nb.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    out = cellblock(env, "run", "--profile", "nope", str(nb), cwd=tmp_path)
    assert_bad_input(out, "unknown profile 'nope'", "known profiles: agent, analyst")
    assert not (tmp_path / "nb.executed.ipynb").exists()


def test_run_missing_notebook(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.ipynb"
    out = cellblock(env, "run", str(missing), cwd=tmp_path)
    assert_bad_input(out, f"notebook '{missing}' does not exist")


@pytest.mark.parametrize("content", ["not json", '{"cells": 3}', "{}", b"\xce\xff"])
def test_run_not_a_notebook(env: dict[str, str], tmp_path: Path, content: str | bytes) -> None:
    nb = tmp_path / "bad.ipynb"
    if isinstance(content, bytes):
        nb.write_bytes(content)
    else:
        nb.write_text(content)
    out = cellblock(env, "run", str(nb), cwd=tmp_path)
    assert_bad_input(out, f"notebook '{nb}'")


def test_run_output_dir_missing(env: dict[str, str], tmp_path: Path) -> None:
    nb = tmp_path / "nb.ipynb"
    nb.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    target = tmp_path / "no" / "such" / "out.ipynb"
    out = cellblock(env, "run", str(nb), "--output", str(target), cwd=tmp_path)
    assert_bad_input(out, f"--output '{target}'", f"directory '{target.parent}' does not exist")


def test_run_quickstart_on_a_profile_without_the_sample(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[profiles.plain]\n")
    out = cellblock({**env, "CELLBLOCK_POLICY": str(policy)}, "run", "--profile", "plain",
                    cwd=tmp_path)
    assert_bad_input(out, "the embedded quickstart reads the built-in dataset 'sample', which "
                     "profile 'plain' does not allow (it allows: none); add it to "
                     "profiles.plain.datasets, or run a notebook of your own")
    assert not (tmp_path / "quickstart.executed.ipynb").exists()  # refused before a start


@pytest.mark.parametrize("datasets", ["hr", "sample,hr"])
def test_run_datasets_outside_the_profile(env: dict[str, str], tmp_path: Path,
                                          datasets: str) -> None:
    nb = tmp_path / "nb.ipynb"
    nb.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    out = cellblock(env, "run", str(nb), "--datasets", datasets, cwd=tmp_path)
    assert_bad_input(out, "dataset 'hr' is not allowed by profile 'agent'; it allows: sample")
    assert not (tmp_path / "nb.executed.ipynb").exists()


# -- the run summary (pure) -------------------------------------------------------------------

def test_summary_lines() -> None:
    summary = RunSummary(
        cells=3, errors=0, first_error="", kernel_id="k", audit_log=Path("/a/k.jsonl"),
        granted=("sample",), opened={"sample": 1}, refused={"hr": 2},
        effects=(CellEffect(1, PolicyReport(truncated_bytes=1234, limits_hit=("cell_seconds",),
                                            notes=("1,234 bytes of stdout truncated",
                                                   "withheld text/html"))),
                 CellEffect(3, PolicyReport(redactions={"github-pat": 2, "email": 1}))),
        reported=((2, "network: refused"),))
    assert summary.details() == [
        "what cellblock did (from the kernel's audit log, written outside the jail):",
        "  cut        code cell 1: 1,234 bytes of output (the marker in its output says where)",
        "  redacted   code cell 3: 3 matches of email, github-pat x2",
        "  limits hit code cell 1: cell_seconds",
        "  withheld   code cell 1: withheld text/html",
        "  datasets   granted sample; the broker opened read-only sample (1 time); "
        "refused hr (2 times)",
        "what the notebook reported (cells tagged cellblock-summary):",
        "  code cell 2: network: refused",
        "audit log: /a/k.jsonl",
    ]
    assert RunSummary(cells=1, errors=0, first_error="", audit_log=Path("/a")).details() == []


@pytest.mark.parametrize(("text", "shown"), [
    ("plain", "plain"),
    ("\x1b]0;title\x07\x1b[31mred\x1b[0m", "]0;title [31mred [0m"),
    ("a\u202eb\u200bc\rd\x00e", "a b c d e"),
    ("x" * 300, "x" * 197 + "..."),
])
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize("args", [
    ("profiles", "list"), ("profiles", "show", "agent"), ("doctor",), ("install", "--user"),
    ("run", "x.ipynb"),
])
def test_policy_error_is_one_line(env: dict[str, str], tmp_path: Path,
                                  args: tuple[str, ...]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[profiles.agent]\nmemmory = "1GiB"\n\n[profiles.agent.limits]\n'
                      'memory = "lots"\n')
    out = cellblock({**env, "CELLBLOCK_POLICY": str(policy)}, *args, cwd=tmp_path)
    assert_bad_input(
        out, f"invalid policy (builtin + {policy})",
        "profiles.agent.memmory: unknown key; allowed keys here: allow_stdin,",
        "profiles.agent.limits.memory = 'lots': Value error, expected a size such as 512MiB",
    )


def test_missing_policy_file(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    out = cellblock({**env, "CELLBLOCK_POLICY": str(missing)}, "profiles", "list")
    assert_bad_input(out, f"policy file {missing} does not exist")


def test_invalid_toml(env: dict[str, str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[profiles.agent\n")
    out = cellblock({**env, "CELLBLOCK_POLICY": str(policy)}, "profiles", "list")
    assert_bad_input(out, f"policy file {policy} is not valid TOML")


def test_bad_nsjail_for_show(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nsjail"
    out = cellblock({**env, "CELLBLOCK_NSJAIL": str(missing)}, "profiles", "show", "agent")
    assert_bad_input(out, f"nsjail '{missing}' (from $CELLBLOCK_NSJAIL) is not an executable")


@pytest.mark.parametrize(("args", "message"), [
    ((), "the following arguments are required: command"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("profiles",), "the following arguments are required: action"),
    (("profiles", "show"), "the following arguments are required: name"),
    (("run", "--timeout", "soon"), "argument --timeout: invalid float value: 'soon'"),
    (("install", "--user", "--prefix", "/x"), "not allowed with argument --user"),
])
def test_argparse_errors_exit_2(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    out = cellblock(env, *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_reader_leaving_the_pipe_is_not_an_error(env: dict[str, str]) -> None:
    """`cellblock profiles show analyst | head -1`: no traceback when the reader is gone
    (here it is gone before the first write, so every write meets a closed pipe)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([str(BIN / "cellblock"), "profiles", "show", "analyst"], env=env,
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


@pytest.mark.jail
@pytest.mark.nonroot
@pytest.mark.parametrize("profile", ["agent", "analyst"])
async def test_profiles_show_prints_the_command_the_warden_runs(
        profile: str, jupyter_env: dict[str, str], no_leftovers: None) -> None:
    """Issue 18: `cellblock profiles show` and the warden build the nsjail command with one
    function; the command of a running kernel (read from /proc) equals the one shown, with
    the kernel's run dir and jail uid in place of KERNEL_ID and the first jail uid."""
    from jupyter_client.manager import AsyncKernelManager

    from cellblock.jailuids import WIDE_RANGE
    from cellblock.rundir import RunDir, runtime_base

    shown = subprocess.run([str(BIN / "cellblock"), "profiles", "show", profile, "--json"],
                           capture_output=True, text=True, check=True, env=os.environ)
    command = json.loads(shown.stdout)["nsjail_command"]
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel()
    try:
        record = RunDir(runtime_base(), str(km.kernel_id)).read_record()
        assert record is not None and record.nsjail_pid is not None
        cmdline = Path(f"/proc/{record.nsjail_pid}/cmdline").read_bytes()
        running = cmdline.decode().rstrip("\0").split("\0")
        shown_ids = f"1000:{WIDE_RANGE[0] if os.geteuid() == 0 else os.getuid()}:1"
        expected = [arg.replace("/KERNEL_ID/", f"/{record.slot}/") for arg in command]
        if os.geteuid() == 0:  # as root each kernel gets its own uid (and gid)
            expected = [a.replace(shown_ids, f"1000:{record.jail_uid}:1") for a in expected]
        assert running == expected
    finally:
        await km.shutdown_kernel(now=True)
