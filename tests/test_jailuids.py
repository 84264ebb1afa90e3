"""Jail uids from ``[host] jail_uids``: the range, what this user namespace maps, one uid
per kernel (claimed), and a real kernel running as a uid from a configured range."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from cellblock.errors import HostUnsupported, PolicyError
from cellblock.jailuids import (
    POD_RANGE,
    WIDE_RANGE,
    claim_uid,
    claims_dir,
    jail_uid_range,
    mapped_ranges,
    parse_uid_range,
    release_uids,
    sweep_claims,
)
from cellblock.policy import load_policy


def test_parse_uid_range() -> None:
    assert parse_uid_range("auto") is None
    assert parse_uid_range("10000-59999") == (10000, 59999)
    assert parse_uid_range(" 0x40000000 - 0x40ffffff ") == (0x40000000, 0x40FFFFFF)
    assert parse_uid_range("7-7") == (7, 7)
    with pytest.raises(ValueError) as bad:
        parse_uid_range("10000")
    assert str(bad.value) == (
        "jail_uids '10000' is not a range: give \"auto\" or \"FIRST-LAST\" (inclusive, "
        "1 <= FIRST <= LAST <= 4294967294, e.g. \"10000-59999\")")
    for value in ("0-10", "20-10", "1-4294967295"):
        with pytest.raises(ValueError, match="out of order or bounds"):
            parse_uid_range(value)


def _maps(tmp_path: Path, uid_map: str, gid_map: str | None = None) -> tuple[str, str]:
    (tmp_path / "uid_map").write_text(uid_map)
    (tmp_path / "gid_map").write_text(uid_map if gid_map is None else gid_map)
    return str(tmp_path / "uid_map"), str(tmp_path / "gid_map")


def test_mapped_ranges_merges(tmp_path: Path) -> None:
    maps = _maps(tmp_path, "  0 100000 1000\n1000 5 1\n 2000 300000 10\n")
    assert mapped_ranges(maps[0]) == [(0, 1000), (2000, 2009)]


def test_auto_is_the_wide_range_on_a_host(tmp_path: Path) -> None:
    maps = _maps(tmp_path, "0 0 4294967295\n")
    assert WIDE_RANGE == (0x40000000, 0x40FFFFFF)
    assert jail_uid_range("auto", env={}, maps=maps) == (
        0x40000000, 0x40FFFFFF, 'host.jail_uids = "auto"')


def test_auto_fits_a_pod_user_namespace(tmp_path: Path) -> None:
    """hostUsers: false, podman --uidmap 0:200000:65536: only 0-65535 exist."""
    maps = _maps(tmp_path, "0 200000 65536\n")
    assert POD_RANGE == (10000, 59999)
    assert jail_uid_range("auto", env={}, maps=maps) == (10000, 59999, 'host.jail_uids = "auto"')


def test_auto_with_neither_range_names_the_fix(tmp_path: Path) -> None:
    maps = _maps(tmp_path, "0 1000 1\n")
    with pytest.raises(HostUnsupported) as err:
        jail_uid_range("auto", env={}, maps=maps)
    assert str(err.value) == (
        'host.jail_uids = "auto": this user namespace maps neither 1073741824-1090519039 '
        "nor 10000-59999 (uids 0-0, gids 0-0). Fix: set [host] jail_uids (or "
        "$CELLBLOCK_JAIL_UIDS) to a range inside the mapped ids, or run with a larger uid map")


def test_an_unmapped_explicit_range_is_refused(tmp_path: Path) -> None:
    maps = _maps(tmp_path, "0 200000 65536\n", "0 200000 70000\n")
    env = {"CELLBLOCK_JAIL_UIDS": "60000-69999"}
    with pytest.raises(HostUnsupported) as err:
        jail_uid_range("auto", env=env, maps=maps)
    assert str(err.value) == (
        '$CELLBLOCK_JAIL_UIDS = "60000-69999": ids 60000-69999 are not all mapped in this '
        "user namespace (mapped uids: 0-65535), so nsjail cannot map a jail to them. Fix: "
        "set [host] jail_uids (or $CELLBLOCK_JAIL_UIDS) to a range inside the mapped ids, "
        'e.g. "10000-59999" in a pod with hostUsers: false')
    assert jail_uid_range("20000-20009", env={}, maps=maps) == (
        20000, 20009, 'host.jail_uids = "20000-20009"')


def test_policy_setting_and_env_override(tmp_path: Path) -> None:
    policy = tmp_path / "cellblock.toml"
    policy.write_text('[host]\njail_uids = "20000-20999"\n')
    assert load_policy(policy, env={}).host.jail_uids == "20000-20999"
    over = load_policy(policy, env={"CELLBLOCK_JAIL_UIDS": "30000-30009"})
    assert over.host.jail_uids == "30000-30009"
    assert over.sources[-1] == "$CELLBLOCK_JAIL_UIDS"
    assert load_policy(os.devnull, env={}).host.jail_uids == "auto"
    policy.write_text('[host]\njail_uids = "all of them"\n')
    with pytest.raises(PolicyError) as err:
        load_policy(policy, env={})
    assert "host.jail_uids = 'all of them': Value error, jail_uids 'all of them' is not a " \
        'range: give "auto" or "FIRST-LAST"' in str(err.value)


def test_claims_give_each_kernel_its_own_uid(tmp_path: Path) -> None:
    base = tmp_path / "run"
    claims = tmp_path / "run-uids"
    assert claims_dir(base) == claims
    first = 3_000_000_000  # no account has these
    uids = [claim_uid(base, f"k{i}", first, first + 2) for i in range(3)]
    assert sorted(uids) == [first, first + 1, first + 2]
    assert [os.readlink(claims / str(u)) for u in uids] == ["k0", "k1", "k2"]
    assert not base.exists()  # the runtime base holds run dirs only
    with pytest.raises(HostUnsupported) as err:
        claim_uid(base, "k3", first, first + 2)
    assert str(err.value) == (f"every jail uid in {first}-{first + 2} is held by a kernel or "
                              "an account; widen [host] jail_uids or stop some kernels")
    release_uids(base, "k0", uids[2])  # k2's uid: not k0's to release
    release_uids(base, "k1")  # by slot, uid unknown
    assert sorted(os.listdir(claims)) == sorted(str(u) for u in (uids[0], uids[2]))
    assert claim_uid(base, "k4", first, first + 2) == uids[1]


def test_claims_skip_accounts(tmp_path: Path) -> None:
    taken = {p.pw_uid for p in pwd.getpwall()}
    account = next(u for u in sorted(taken) if u > 0 and u + 1 not in taken)
    assert claim_uid(tmp_path / "run", "k", account, account + 1) == account + 1
    with pytest.raises(HostUnsupported):
        claim_uid(tmp_path / "run", "k2", account, account)


def test_sweep_drops_only_claims_of_missing_run_dirs(tmp_path: Path) -> None:
    base, claims = tmp_path / "run", tmp_path / "run-uids"
    (base / "live").mkdir(parents=True)
    claims.mkdir()
    os.symlink("live", claims / "5")
    os.symlink("gone", claims / "6")
    os.symlink("fresh", claims / "7")
    os.utime(claims / "6", (1, 1), follow_symlinks=False)
    os.utime(claims / "5", (1, 1), follow_symlinks=False)
    sweep_claims(base)  # "fresh" names a run dir its warden is about to make
    assert sorted(os.listdir(claims)) == ["5", "7"]


def _kernel_uid(nsjail_pid: int) -> int:
    """The host uid of the jailed process nsjail started (its only child)."""
    children = Path(f"/proc/{nsjail_pid}/task/{nsjail_pid}/children").read_text().split()
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


@pytest.mark.jail
@pytest.mark.skipif(os.geteuid() != 0, reason="the range applies as root; unprivileged, the "
                    "jail runs as the caller's own uid")
async def test_a_kernel_runs_as_a_uid_from_the_configured_range(
        jupyter_env: dict[str, str], no_leftovers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.manager import AsyncKernelManager

    from cellblock.rundir import RunDir, runtime_base
    from tests.test_budgets import run

    first, last = 3_000_000_000, 3_000_000_003
    monkeypatch.setenv("CELLBLOCK_JAIL_UIDS", f"{first}-{last}")
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await run(kc, "import os; print(os.getuid(), os.getgid())")
        assert out["stdout"] == "1000 1000\n"
        record = RunDir(runtime_base(), str(km.kernel_id)).read_record()
        assert record is not None and record.nsjail_pid is not None
        assert first <= record.jail_uid <= last
        assert _kernel_uid(record.nsjail_pid) == record.jail_uid
        claim = claims_dir(runtime_base()) / str(record.jail_uid)
        assert os.readlink(claim) == record.slot
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    assert not os.path.lexists(claim)  # released with the run dir
