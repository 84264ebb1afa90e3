"""The pure and host-side parts of cellblock.files, with exact values: names, the policy's
defaults and errors, the jail command's mounts, what leaves for each kind of file, the
inbox's caps on a real directory, and the outbox reader on real symlinks, FIFOs and sparse
files (no jail: the reader is given the directory; tests/test_files.py covers the jail)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cellblock.errors import FileRefused
from cellblock.files.inbox import Inbox, check_name
from cellblock.files.outbox import list_outbox, read_outbox
from cellblock.files.service import classify
from cellblock.jailcmd import JailLayout, nsjail_argv
from cellblock.policy import FilesPolicy, Profile, load_policy
from cellblock.redact import Redactor

pytestmark = pytest.mark.nonroot

SECRET = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20


@pytest.mark.parametrize(("name", "ok"), [
    ("sales.csv", True), ("a", True), ("A-b_c.9.txt", True), ("x" * 128, True),
    ("-dash.csv", True), ("a..b", True),
    ("", False), (".env", False), ("..", False), ("../x", False), ("a/b", False),
    ("x" * 129, False), ("a b", False), ("a\nb", False), ("a\x00b", False), ("é.csv", False),
    ("a\\b", False), ("a:b", False),
])
def test_names(name: str, ok: bool) -> None:
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(FileRefused) as info:
            check_name(name)
        assert info.value.code == "bad_name"
        assert "1-128 characters of A-Z a-z 0-9 . _ -" in str(info.value)


def test_a_new_profile_has_no_files_and_builtins_have_both() -> None:
    assert not Profile().files.inbox and not Profile().files.outbox
    policy = load_policy()
    for name in ("agent", "analyst"):
        files = policy.profile(name).files
        assert files.inbox and files.outbox and files.redact_text


@pytest.mark.parametrize(("fields", "words"), [
    ({"text_suffixes": ["csv"]}, "suffix 'csv': a dot and 1-10 of a-z 0-9"),
    ({"image_suffixes": [".bmp"]}, "'.png', '.jpg', '.jpeg', '.gif' or '.webp'"),
    ({"outbox_size": "10KiB"}, "greater than or equal to 1048576"),
    ({"max_inbox_files": 0}, "greater than or equal to 1"),
    ({"inboxes": True}, "Extra inputs are not permitted"),
])
def test_policy_errors_name_the_value(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        FilesPolicy.model_validate(fields)
    assert words in str(info.value)


LAYOUT = JailLayout(
    ipc_dir=Path("/r/k1/ipc"), pkg_dir=Path("/r/k1/pkg"), passwd=Path("/r/k1/passwd"),
    group=Path("/r/k1/group"), outside_uid=1001, outside_gid=1001, inbox=Path("/r/k1/inbox"),
)


def test_jail_command_mounts_the_inbox_read_only_and_a_capped_outbox() -> None:
    profile = Profile(files=FilesPolicy(inbox=True, outbox=True, outbox_size="2MiB",
                                        outbox_files=32))
    argv = nsjail_argv(nsjail="/n", profile=profile, layout=LAYOUT,
                       python=Path("/usr/bin/python3"), env_mounts=())
    pairs = list(itertools.pairwise(argv))
    assert ("--bindmount_ro", "/r/k1/inbox:/inbox") in pairs
    assert ("--mount", "none:/outbox:tmpfs:size=2097152,nr_inodes=32,mode=700,uid=1000,"
            "gid=1000") in pairs
    assert "--bindmount" not in argv  # nothing of the host is writable in the jail
    argv = nsjail_argv(nsjail="/n", profile=Profile(), layout=LAYOUT,
                       python=Path("/usr/bin/python3"), env_mounts=())
    assert not [a for a in argv if "/inbox" in a or "/outbox" in a]


def _profile(**files: object) -> Profile:
    return Profile(files=FilesPolicy.model_validate({"text_suffixes": [".csv", ".txt"],
                                                     "image_suffixes": [".png", ".webp"],
                                                     **files}))


@pytest.mark.parametrize(("name", "data", "kind", "mime", "sent", "rules"), [
    ("a.csv", b"x,y\n1,2\n", "text", "text/csv", b"x,y\n1,2\n", []),
    ("a.txt", f"t={SECRET}\n".encode(), "text", "text/plain", b"t=[REDACTED:github-pat]\n",
     ["github-pat"]),
    ("A.CSV", b"1\n", "text", "text/csv", b"1\n", []),
    ("p.png", PNG, "image", "image/png", PNG, []),
    ("p.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image", "image/webp",
     b"RIFF\x00\x00\x00\x00WEBPVP8 ", []),
])
def test_what_leaves(name: str, data: bytes, kind: str, mime: str, sent: bytes,
                     rules: list[str]) -> None:
    info, body = classify(_profile(), Redactor(secrets=True), name, data)
    assert (info, body) == ({"kind": kind, "mime": mime, "redactions": rules}, sent)


def test_text_is_sent_as_written_when_redact_text_is_off() -> None:
    data = f"t={SECRET}\n".encode()
    assert classify(_profile(redact_text=False), Redactor(secrets=True), "a.txt", data)[1] \
        == data


@pytest.mark.parametrize(("name", "data", "code", "words"), [
    ("a.txt", b"\xff\xfe", "not_text", "is not UTF-8 text (byte 0)"),
    ("p.png", b"GIF89a....", "type", "does not start like a image/png file"),
    ("p.webp", b"RIFF\x00\x00\x00\x00AVI ", "type", "does not start like a image/webp"),
    ("a.bin", b"\x00", "type", "lets out only files named *{.csv, .txt, .png, .webp}"),
    ("noext", b"x", "type", "lets out only files named"),
    ("p.jpg", b"\xff\xd8\xff", "type", "lets out only files named"),  # not in this profile
])
def test_what_is_refused(name: str, data: bytes, code: str, words: str) -> None:
    with pytest.raises(FileRefused) as info:
        classify(_profile(), None, name, data)
    assert info.value.code == code and words in str(info.value), str(info.value)


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox.tmp").mkdir()
    box = Inbox(tmp_path, FilesPolicy(inbox=True, max_upload=100, max_inbox_files=2,
                                      max_inbox_bytes=102))
    yield box
    box.close()


def test_inbox_writes_whole_files_and_keeps_its_caps(inbox: Inbox, tmp_path: Path) -> None:
    assert len(inbox.receive("a.csv", 3, iter([b"a", b"bc"]))) == 64
    assert (tmp_path / "inbox" / "a.csv").read_bytes() == b"abc"
    assert oct((tmp_path / "inbox" / "a.csv").stat().st_mode & 0o777) == "0o640"
    cases = [
        ("b.csv", 101, [b"x" * 101], "too_large", "at most 100 B (100 bytes, files.max_upload)"),
        ("b.csv", 5, [b"xx"], "incomplete", "ended after 2 of the 5 bytes"),
        ("b.csv", 2, [b"xxx"], "too_large", "sent more than the 2 bytes"),
        ("b.csv", 100, [b"x" * 100], "too_large", "would bring the inbox to 103 bytes"),
    ]
    for name, size, chunks, code, words in cases:
        with pytest.raises(FileRefused) as info:
            inbox.receive(name, size, iter(chunks))
        assert info.value.code == code and words in str(info.value), str(info.value)
    assert not (tmp_path / "inbox" / "b.csv").exists()
    assert os.listdir(tmp_path / "inbox.tmp") == []  # no partial file is left
    inbox.receive("b.csv", 1, iter([b"b"]))
    with pytest.raises(FileRefused) as info:
        inbox.receive("c.csv", 1, iter([b"c"]))
    assert info.value.code == "too_many"
    inbox.receive("a.csv", 100, iter([b"z" * 100]))  # a replacement counts once
    assert inbox.files() == [("a.csv", 100), ("b.csv", 1)]


def test_inbox_does_not_read_a_refused_upload(inbox: Inbox) -> None:
    def never() -> object:
        raise AssertionError("the body of a refused upload was read")
        yield b""

    with pytest.raises(FileRefused):
        inbox.receive("big.csv", 1000, never())  # type: ignore[arg-type]


def test_outbox_reader_follows_nothing_and_reads_only_what_it_may(tmp_path: Path) -> None:
    box = tmp_path / "outbox"
    box.mkdir()
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only\n")
    (box / "ok.txt").write_text("fine\n")
    (box / "abs.txt").symlink_to(secret)
    (box / "rel.txt").symlink_to("../host-secret.txt")
    os.mkfifo(box / "pipe.txt")
    (box / "dir.txt").mkdir()
    with open(box / "sparse.csv", "wb") as f:
        f.truncate(10 * 1024**3)
    (box / "bad name.txt").write_text("x")
    (box / ".dot").write_text("x")
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries, hidden = list_outbox(fd)
        assert [(e.name, e.kind) for e in entries] == [
            ("abs.txt", "symlink"), ("dir.txt", "directory"), ("ok.txt", "file"),
            ("pipe.txt", "fifo"), ("rel.txt", "symlink"), ("sparse.csv", "file")]
        assert hidden == 2
        assert read_outbox(fd, "ok.txt", 100) == b"fine\n"
        for name, code in (("abs.txt", "not_regular"), ("rel.txt", "not_regular"),
                           ("pipe.txt", "not_regular"), ("dir.txt", "not_regular"),
                           ("sparse.csv", "too_large"), ("ok.txt/..", "bad_name"),
                           ("nope.txt", "not_found")):
            with pytest.raises(FileRefused) as info:
                read_outbox(fd, name, 100)
            assert info.value.code == code, (name, info.value)
        with pytest.raises(FileRefused) as info:
            read_outbox(fd, "ok.txt", 4)
        assert info.value.code == "too_large"
    finally:
        os.close(fd)
