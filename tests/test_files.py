"""Files in and out of real jailed kernels through the helper (cellblock.sandbox): the inbox
the client fills and the jail reads, the outbox the jail fills and the warden reads.

Real wardens, nsjail and ipykernel; a kernel that plants symlinks, FIFOs, a 10 GB sparse
file, bad names and secrets in its outbox; every cap hit with the error it must say."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from cellblock.audit import EVENT_FIELDS
from cellblock.errors import FileRefused, SandboxStopped
from cellblock.files.client import run_dir_of
from cellblock.sandbox import Sandbox, SyncSandbox

from conftest import audit_events, wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

# A GitHub token shape, assembled in the kernel so the code itself carries no finding.
SECRET = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"
SALES = "day,region,amount\n1,north,10\n2,south,20\n3,north,30\n4,south,40\n"

FILES_POLICY = """
[profiles.filebox]
description = "files tests: small caps, a file size limit past 10 GB"

[profiles.filebox.limits]
file_size = "16GiB"

[profiles.filebox.files]
inbox = true
max_upload = "64KiB"
max_inbox_files = 3
max_inbox_bytes = "100KiB"
outbox = true
outbox_size = "2MiB"
outbox_files = 16
max_download = "1MiB"
text_suffixes = [".csv", ".txt"]
image_suffixes = [".png"]

[profiles.nofiles]
description = "no inbox, no outbox (the default)"

[profiles.pooledfiles]
warm_pool = 1

[profiles.restartfiles.budgets]
cell_seconds = 1.5
grace_seconds = 1

[profiles.restartfiles.files]
inbox = true
outbox = true

[profiles.pooledfiles.files]
inbox = true
outbox = true
"""

ANALYSE = """
import pandas as pd, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cellblock_kernel import files
print([f.name for f in files.list()])
df = pd.read_csv(files.path("sales.csv"))
totals = df.groupby("region")["amount"].sum()
totals.to_csv(files.outbox("totals.csv"))
ax = totals.plot.bar()
ax.figure.savefig(files.outbox("chart.png"))
print(int(totals.sum()))
"""


@pytest.fixture
def filebox(operator: Any, jupyter_env: dict[str, str]) -> None:
    operator(FILES_POLICY)


def events(kernel_id: str, prefix: str) -> list[Any]:
    found = [e for e in audit_events(kernel_id) if e.event.startswith(prefix)]
    for e in found:  # each matches its published model (cellblock audit --schema)
        if e.event.startswith("files."):
            EVENT_FIELDS[e.event].model_validate(e.fields)
    return found


async def test_upload_analyse_and_fetch_a_chart_and_a_csv(jupyter_env: dict[str, str]) -> None:
    async with Sandbox("agent") as sb:
        done = await sb.upload("sales.csv", SALES.encode())
        assert done == {"name": "sales.csv", "size": len(SALES),
                        "sha256": hashlib.sha256(SALES.encode()).hexdigest()}
        assert await sb.inbox() == [{"name": "sales.csv", "size": len(SALES)}]
        r = await sb.run(ANALYSE)
        assert r.ok, r.errors
        assert r.stdout == "['sales.csv']\n100\n"
        listed = {f["name"]: f for f in await sb.files()}
        assert set(listed) == {"totals.csv", "chart.png"}
        assert all(f["kind"] == "file" for f in listed.values())
        table = await sb.download("totals.csv")
        assert (table.kind, table.mime, table.redactions) == ("text", "text/csv", [])
        assert table.text == "region,amount\nnorth,40\nsouth,60\n"
        chart = await sb.download("chart.png")
        assert (chart.kind, chart.mime) == ("image", "image/png")
        assert chart.data.startswith(b"\x89PNG\r\n\x1a\n") and len(chart.data) > 1000
        assert chart.sha256 == hashlib.sha256(chart.data).hexdigest()
        kernel_id = sb.kernel_id
        assert kernel_id is not None
    up = events(kernel_id, "files.upload")
    assert [(e.fields["name"], e.fields["size"], e.fields["sha256"]) for e in up] == [
        ("sales.csv", len(SALES), done["sha256"])]
    down = {e.fields["name"]: e.fields for e in events(kernel_id, "files.download")}
    assert down["chart.png"]["sha256"] == chart.sha256
    assert down["totals.csv"]["size"] == len(table.data)
    log = (Path(jupyter_env["CELLBLOCK_AUDIT_DIR"]) / f"{kernel_id}.jsonl").read_text()
    assert "north" not in log and "PNG" not in log  # names, sizes, hashes; never contents


async def test_a_secret_in_an_outbox_text_file_arrives_redacted() -> None:
    async with Sandbox("agent") as sb:
        r = await sb.run("s = 'ghp_' + 'aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5'\n"
                         "open('/outbox/notes.txt', 'w').write(f'token={s}\\nok\\n')\n"
                         "open('/outbox/clean.txt', 'w').write('nothing here\\n')")
        assert r.ok, r.errors
        got = await sb.download("notes.txt")
        assert SECRET not in got.text and "[REDACTED:" in got.text
        assert got.text.endswith("ok\n") and got.redactions
        assert (await sb.download("clean.txt")).text == "nothing here\n"
        kernel_id = sb.kernel_id
        assert kernel_id is not None
    fields = {e.fields["name"]: e.fields for e in events(kernel_id, "files.download")}
    assert fields["notes.txt"]["redactions"] == got.redactions
    assert fields["notes.txt"]["read_sha256"] != fields["notes.txt"]["sha256"]


HOSTILE = r"""
import os
os.symlink("/etc/os-release", "/outbox/link.txt")  # the host's file, not the jail's
os.symlink("chart.png", "/outbox/rel.png")
os.mkfifo("/outbox/pipe.txt")
os.mkdir("/outbox/sub.txt")
with open("/outbox/sparse.csv", "wb") as f:
    f.truncate(10 * 1024**3)
open("/outbox/bad name\nwith newline.txt", "w").write("x")
open("/outbox/.hidden.txt", "w").write("x")
open("/outbox/fine.txt", "w").write("fine\n")
open("/outbox/bytes.txt", "wb").write(b"\xff\xfe not utf-8")
open("/outbox/fake.png", "w").write("GIF89a not a png")
open("/outbox/data.bin", "wb").write(b"\x00" * 10)
print(os.stat("/outbox/sparse.csv").st_size)
"""


async def test_what_the_kernel_plants_in_the_outbox_is_refused_cleanly(filebox: None) -> None:
    async with Sandbox("filebox") as sb:
        r = await sb.run(HOSTILE)
        assert r.ok, r.errors
        assert r.stdout == f"{10 * 1024**3}\n"
        listed = {f["name"]: f["kind"] for f in await sb.files()}
        assert listed == {"link.txt": "symlink", "rel.png": "symlink", "pipe.txt": "fifo",
                          "sub.txt": "directory", "sparse.csv": "file", "fine.txt": "file",
                          "bytes.txt": "file", "fake.png": "file", "data.bin": "file"}
        expected = {
            "link.txt": ("not_regular", "symbolic link"),
            "rel.png": ("not_regular", "symbolic link"),
            "pipe.txt": ("not_regular", "fifo"),
            "sub.txt": ("not_regular", "directory"),
            "sparse.csv": ("too_large", "10737418240 bytes"),
            "bytes.txt": ("not_text", "not UTF-8"),
            "fake.png": ("type", "does not start like a image/png"),
            "data.bin": ("type", "lets out only files named"),
            "nothere.txt": ("not_found", "no file"),
        }
        for name, (code, words) in expected.items():
            # (a FIFO opened without O_NONBLOCK would block the warden: the client would
            # time out with "not_running", not "not_regular")
            with pytest.raises(FileRefused) as info:
                await sb.download(name)
            assert (info.value.code, name) == (code, name), info.value
            assert words in str(info.value), str(info.value)
        assert (await sb.download("fine.txt")).text == "fine\n"
        # the warden is still serving, and the kernel still runs
        assert (await sb.run("1 + 1")).results == [{"text/plain": "2"}]
        kernel_id = sb.kernel_id
        assert kernel_id is not None
    refused = [e.fields for e in events(kernel_id, "files.refused")]
    assert {f["name"]: f["code"] for f in refused} == {
        n: c for n, (c, _) in expected.items()}


async def test_upload_caps_and_names_are_enforced_with_clear_errors(filebox: None) -> None:
    async with Sandbox("filebox") as sb:
        for bad in ("../etc", "a/b", ".hidden", "x\n", "x" * 129, "", "sp ace.csv", "é.csv"):
            with pytest.raises(FileRefused) as info:
                await sb.upload(bad, b"x")
            assert info.value.code == "bad_name" and "A-Z a-z 0-9 . _ -" in str(info.value)
        with pytest.raises(FileRefused) as info:
            await sb.upload("big.csv", b"x" * (64 * 1024 + 1))
        assert info.value.code == "too_large"
        assert "65537 bytes" in str(info.value) and "files.max_upload" in str(info.value)
        for i in range(3):
            await sb.upload(f"f{i}.csv", b"y" * (30 * 1024))
        with pytest.raises(FileRefused) as info:
            await sb.upload("f3.csv", b"z")
        assert info.value.code == "too_many" and "max_inbox_files = 3" in str(info.value)
        with pytest.raises(FileRefused) as info:  # replacing one: 30 + 30 + 50 KiB > 100 KiB
            await sb.upload("f2.csv", b"w" * (50 * 1024))
        assert info.value.code == "too_large" and "max_inbox_bytes" in str(info.value)
        await sb.upload("f2.csv", b"v" * 10)  # replacing with a smaller one is fine
        assert [f["size"] for f in await sb.inbox()] == [30 * 1024, 30 * 1024, 10]
        # the jail reads the inbox and cannot change it
        r = await sb.run("import os\nprint(open('/inbox/f2.csv').read())\n"
                         "for op in (lambda: open('/inbox/f2.csv', 'w'),\n"
                         "           lambda: os.unlink('/inbox/f0.csv'),\n"
                         "           lambda: open('/inbox/new.csv', 'w')):\n"
                         "    try:\n        op()\n        print('WROTE')\n"
                         "    except OSError as e:\n        print(e.errno)")
        assert r.stdout.split() == ["vvvvvvvvvv", "30", "30", "30"]  # EROFS, three times
        # the outbox tmpfs is capped in bytes and in files
        r = await sb.run("import errno\ndef fill(make):\n    try:\n        make()\n"
                         "    except OSError as e:\n        return errno.errorcode[e.errno]\n"
                         "print(fill(lambda: open('/outbox/full.txt', 'wb').write(b'x' * "
                         "(3 * 1024**2))))\n"
                         "print(fill(lambda: [open(f'/outbox/n{i}.txt', 'w').close() "
                         "for i in range(100)]))")
        assert r.stdout.split() == ["ENOSPC", "ENOSPC"]


async def test_a_profile_without_files_has_no_inbox_or_outbox(filebox: None) -> None:
    async with Sandbox("nofiles") as sb:
        with pytest.raises(FileRefused) as info:
            await sb.upload("a.csv", b"1")
        assert info.value.code == "disabled" and "files.inbox = false" in str(info.value)
        with pytest.raises(FileRefused) as info:
            await sb.files()
        assert info.value.code == "disabled"
        r = await sb.run("import os\nprint(os.path.exists('/inbox'), os.path.exists('/outbox'))")
        assert r.stdout == "False False\n"


def test_sync_sandbox_and_a_stopped_one(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text(SALES)
    sb = SyncSandbox("agent")
    with pytest.raises(SandboxStopped):
        sb.upload("in.csv", source)
    with sb:
        assert sb.upload("in.csv", source)["size"] == len(SALES)  # a path, streamed
        assert sb.run("print(open('/inbox/in.csv').read().count('north'))").stdout == "2\n"
        sb.run("open('/outbox/out.txt', 'w').write('hi\\n')")
        assert sb.download("out.txt").text == "hi\n"
        kernel_id = sb.kernel_id
        assert kernel_id is not None
        run = run_dir_of(kernel_id)
        assert oct(os.stat(run / "files.sock").st_mode & 0o777) == "0o600"
        # the uploads are the jail's to read and nobody else's (as root: its own group)
        inbox, upload = os.stat(run / "inbox"), os.stat(run / "inbox" / "in.csv")
        if os.geteuid() == 0:
            assert (oct(inbox.st_mode & 0o777), oct(upload.st_mode & 0o777)) == (
                "0o750", "0o640")
            assert inbox.st_gid == upload.st_gid != 0
        else:
            assert oct(inbox.st_mode & 0o777) == "0o700"
    with pytest.raises(FileRefused) as info:
        run_dir_of(kernel_id)
    assert info.value.code == "not_found"


async def test_an_adopted_pooled_kernel_has_its_files(filebox: None) -> None:
    from cellblock.warden.client import warm

    assert wait_for(lambda: warm("pooledfiles", timeout=120)["ready"] == 1, timeout=150)
    try:
        async with Sandbox("pooledfiles") as sb:
            assert sb.kernel_id is not None
            assert run_dir_of(sb.kernel_id).name.startswith("pool-")  # adopted, not cold
            await sb.upload("in.txt", b"pooled\n")
            r = await sb.run("open('/outbox/out.txt','w').write(open('/inbox/in.txt').read())")
            assert r.ok
            assert (await sb.download("out.txt")).text == "pooled\n"
    finally:
        assert warm("pooledfiles", size=0)["size"] == 0


async def test_a_jail_restarted_in_place_is_read_not_the_old_one(filebox: None) -> None:
    """The warden kills a cell past its grace and starts a new jail in the same run dir:
    the inbox stays (the host's), the outbox is the new jail's, found anew by its nsjail."""
    async with Sandbox("restartfiles") as sb:
        await sb.upload("in.txt", b"kept\n")
        assert (await sb.run("open('/outbox/old.txt', 'w').write('old')")).ok
        r = await sb.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                         "while True:\n    pass")
        assert not r.ok and "restarted" in str([e.value for e in r.errors])
        assert await sb.files() == []
        r = await sb.run("open('/outbox/new.txt', 'w').write(open('/inbox/in.txt').read())")
        assert r.ok, r.errors
        assert [f["name"] for f in await sb.files()] == ["new.txt"]
        assert (await sb.download("new.txt")).text == "kept\n"
