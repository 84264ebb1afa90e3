"""The rest of a cut output, kept by the warden: exact values, no jail.

These tests feed a cell's stream state (cellblock.output.streams) the text the gate would,
with a spool in a temp dir, and read the kept text back with the host's reader
(cellblock.output_pages). The jailed end-to-end runs are in test_output_cost.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cellblock.errors import BadOutputRequest, OutputUnavailable
from cellblock.output import spool as spool_mod
from cellblock.output.filter import build_redactor
from cellblock.output.spool import Spool
from cellblock.output.streams import CellStreams
from cellblock.output_pages import MAX_PAGE, read_page
from cellblock.policy import load_policy

pytestmark = pytest.mark.nonroot

GHP = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"  # GitHub token format, not a real one
HEAD, TAIL = 1024, 256


@pytest.fixture(scope="module")
def redactor() -> Any:
    return build_redactor(load_policy().profile("agent").output, env={})


def cell(tmp_path: Path, redactor: Any, cap: int = 1 << 20, execution: int = 1,
         spool: Spool | None = None) -> CellStreams:
    spool = spool or Spool(tmp_path / "output", cap)
    return CellStreams(HEAD, TAIL, redactor, True, "n0nce", spool, execution)


def feed(streams: CellStreams, text: str, piece: int, name: str = "stdout") -> str:
    """Feed ``text`` in pieces of ``piece`` characters; flush; return what the client got."""
    sent = [streams.feed(name, text[i:i + piece]) for i in range(0, len(text), piece)]
    sent += [t for n, t in streams.flush() if n == name]
    return "".join(sent)


def read_all(directory: Path, execution: int, offset: int, size: int,
             stream: str = "stdout") -> str:
    parts: list[str] = []
    at: int | None = offset
    while at is not None:
        page = read_page(directory, execution, at, size, stream)
        parts.append(page.text)
        at = page.next_offset
    return "".join(parts)


def lines(n: int) -> str:
    return "".join(f"row {i} ü€𝄞 value\n" for i in range(n))  # 1-, 2-, 3- and 4-byte UTF-8


@pytest.mark.parametrize("piece", [1, 7, 100, 4096, 10**7])
def test_head_and_kept_rest_are_what_was_printed(tmp_path: Path, redactor: Any,
                                                 piece: int) -> None:
    text = lines(3000 if piece > 1 else 300)
    sent = feed(cell(tmp_path, redactor), text, piece)
    head, marker = sent.split("\n[cellblock n0nce: ")[0], sent.split("\n[cellblock ")[1]
    offset = len(head.encode())
    assert f"read_output(execution=1, offset={offset})" in marker
    kept = (tmp_path / "output" / "1.stdout").read_bytes().decode()
    assert kept == text  # nothing to redact: the stream as printed, byte for byte
    assert head + read_all(tmp_path / "output", 1, offset, 333) == text


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 4096, MAX_PAGE])
def test_pages_end_on_characters_and_join_up(tmp_path: Path, redactor: Any, size: int) -> None:
    text = lines(400)
    feed(cell(tmp_path, redactor), text, 50)
    assert read_all(tmp_path / "output", 1, 0, size) == text
    page = read_page(tmp_path / "output", 1, 0, size)
    assert len(page.text.encode()) <= max(size, 4)


@pytest.mark.parametrize("at", [HEAD - 30, HEAD - 20, HEAD - 5, HEAD, HEAD + 3, HEAD + 200,
                                HEAD + spool_mod.BATCH - 10])
@pytest.mark.parametrize("piece", [1, 9, 64, 10**6])
def test_a_secret_split_at_the_cut_leaks_in_neither(tmp_path: Path, redactor: Any, at: int,
                                                    piece: int) -> None:
    """A token printed across the head's end, or across a batch of the kept part, in pieces
    of any size: neither what was sent nor what was kept holds it, nor a long piece of it."""
    text = "x" * (at - 10) + " token: " + GHP + " and more\n" + "y" * (spool_mod.BATCH * 2)
    sent = feed(cell(tmp_path, redactor), text, piece)
    kept = (tmp_path / "output" / "1.stdout").read_bytes().decode()
    for where in (sent, kept):
        assert GHP not in where
        assert GHP[4:20] not in where and GHP[-16:] not in where
    assert "[REDACTED:" in kept


def test_a_secret_far_past_the_head_is_redacted_in_the_kept_text(tmp_path: Path,
                                                                 redactor: Any) -> None:
    text = "z\n" * 50_000 + f"password = {GHP}\n" + "z\n" * 50_000
    feed(cell(tmp_path, redactor), text, 1000)
    kept = read_all(tmp_path / "output", 1, 0, 4096)
    assert GHP not in kept and "[REDACTED:" in kept
    assert kept.count("z\n") == 100_000


def test_page_boundaries_do_not_change_what_was_redacted(tmp_path: Path,
                                                         redactor: Any) -> None:
    """Redaction happens once, when the text is kept; every page size reads the same text."""
    text = "".join(f"line {i} token={GHP}\n" if i % 97 == 0 else f"line {i}\n"
                   for i in range(5000))
    feed(cell(tmp_path, redactor), text, 333)
    whole = (tmp_path / "output" / "1.stdout").read_bytes().decode()
    assert GHP not in whole
    for size in (1, 17, 1000, 65536):
        assert read_all(tmp_path / "output", 1, 0, size) == whole


def test_a_cell_that_was_not_cut_keeps_nothing(tmp_path: Path, redactor: Any) -> None:
    sent = feed(cell(tmp_path, redactor), "short\n" * 100, 3)
    assert sent == "short\n" * 100
    assert not (tmp_path / "output").exists()  # nothing was written, not even the head
    with pytest.raises(OutputUnavailable, match="no kept stdout for execution 1"):
        read_page(tmp_path / "output", 1)


def test_one_cell_over_the_cap_keeps_its_first_bytes_and_says_what_was_dropped(
        tmp_path: Path, redactor: Any) -> None:
    cap = 50_000
    text = "a" * 9 + "\n" + "b" * 200_000
    sent = feed(cell(tmp_path, redactor, cap=cap), text, 5000)
    assert "only up to byte 50,000: 150,010 bytes after it were not kept" in sent
    assert "output spool of 50,000 bytes is full" in sent
    page = read_page(tmp_path / "output", 1, 0, 100)
    assert (page.total_bytes, page.dropped_bytes, page.complete) == (50_000, 150_010, True)
    assert read_all(tmp_path / "output", 1, 0, 4096) == text[:cap]
    assert os.path.getsize(tmp_path / "output" / "1.stdout") == cap


def test_the_cap_drops_the_oldest_cells_first_and_reading_one_says_so(tmp_path: Path,
                                                                      redactor: Any) -> None:
    spool = Spool(tmp_path / "output", 30_000)
    for n in (1, 2, 3):
        feed(cell(tmp_path, redactor, execution=n, spool=spool), f"{n}" * 12_000, 1000)
    assert spool.used <= 30_000
    with pytest.raises(OutputUnavailable, match=r"kept stdout of execution 1 \(12,000 bytes\) "
                       r"was dropped to make room for execution 3's"):
        read_page(tmp_path / "output", 1)
    assert read_all(tmp_path / "output", 3, 0, 5000) == "3" * 12_000
    assert read_all(tmp_path / "output", 2, 0, 5000) == "2" * 12_000
    used = sum(f.stat().st_size for f in (tmp_path / "output").iterdir()
               if not f.name.endswith(".json"))
    assert used == spool.used <= 30_000


def test_a_flood_holds_a_bounded_buffer(tmp_path: Path, redactor: Any) -> None:
    streams = cell(tmp_path, redactor, cap=1 << 30)
    for _ in range(2000):
        streams.feed("stdout", "q" * 999 + "\n")
        keeper = streams.keepers["stdout"]
        assert keeper is not None and keeper._raw_len < spool_mod.BATCH + 1000
    streams.flush()
    assert os.path.getsize(tmp_path / "output" / "1.stdout") == 2000 * 1000


def test_stderr_has_its_own_kept_text_and_marker(tmp_path: Path, redactor: Any) -> None:
    streams = cell(tmp_path, redactor)
    out = [streams.feed("stdout", "o" * 600), streams.feed("stderr", "e\n" * 5000)]
    out += [t for _n, t in streams.flush()]
    assert any('read_output(execution=1, stream="stderr", offset=' in t for t in out)
    assert read_all(tmp_path / "output", 1, 0, 4096, "stderr") == "e\n" * 5000


@pytest.mark.parametrize(("args", "message"), [
    ((0, 0, 10, "stdout"), "execution must be a cell number >= 1"),
    ((-3, 0, 10, "stdout"), "execution must be a cell number >= 1"),
    (("1", 0, 10, "stdout"), "execution must be a cell number >= 1"),
    ((True, 0, 10, "stdout"), "execution must be a cell number >= 1"),
    ((1, -1, 10, "stdout"), "offset must be a byte offset >= 0, not -1"),
    ((1, 0, 0, "stdout"), f"size must be a number of bytes from 1 to {MAX_PAGE}, not 0"),
    ((1, 0, MAX_PAGE + 1, "stdout"), "size must be a number of bytes from 1 to"),
    ((1, 0, 10, "stdin"), "stream must be one of stdout, stderr, not 'stdin'"),
    ((1, 10**9, 10, "stdout"), "offset 1000000000 is past the end of the kept stdout of "
                               "execution 1: it holds"),
    ((1, 7, 10, "stdout"), "offset 7 falls inside a UTF-8 character"),
])
def test_bad_reads_say_what_is_allowed(tmp_path: Path, redactor: Any, args: tuple[Any, ...],
                                       message: str) -> None:
    feed(cell(tmp_path, redactor), "row 1 €\n" + "x y\n" * 2000, 100)
    with pytest.raises(BadOutputRequest) as info:
        read_page(tmp_path / "output", *args)
    assert message in str(info.value)


def test_the_reader_never_follows_a_link(tmp_path: Path, redactor: Any) -> None:
    """The spool is the warden's, out of the jail's reach; even so, a name in it that is a
    symlink (to a file the reader could read) is refused, not followed."""
    target = tmp_path / "elsewhere"
    target.write_text("not kept output\n")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "4.stdout").symlink_to(target)
    with pytest.raises(OSError):
        read_page(tmp_path / "output", 4)


def test_a_spool_that_cannot_be_written_is_said_and_the_cell_goes_on(tmp_path: Path,
                                                                      redactor: Any) -> None:
    (tmp_path / "output").write_text("a file where the directory should be\n")
    text = lines(300)
    sent = feed(cell(tmp_path, redactor), text, 500)
    assert sent.startswith(text[:500]) and sent.endswith(text[-100:])
    assert "bytes after it were not kept (the host could not write it)" in sent


@pytest.mark.parametrize("k", [4, 5, 20])
@pytest.mark.parametrize("with_spool", [True, False])
def test_a_token_half_released_on_the_timer_at_the_head_end_stays_masked(
        tmp_path: Path, redactor: Any, k: int, with_spool: bool) -> None:
    """Found from the jail: the head fills with a partial token's start, held text goes out
    on the timer with the token masked; the mask marker ran past the head, its own remainder
    went to the tail as the "continuation" and cleared the mask, so the real rest of the
    token went out (and into the kept pages) in clear."""
    streams = (cell(tmp_path, redactor) if with_spool
               else CellStreams(HEAD, TAIL, redactor, True, "n0nce"))
    sent = [streams.feed("stdout", "x" * (HEAD - k) + " " + GHP[:k])]
    sent += [t for _, t in streams.release_due(float("inf"), 0.0)]  # the timer fires
    sent.append(streams.feed("stdout", GHP[k:] + " " + "y" * 2 * TAIL + "\n"))  # cut: kept
    sent += [t for _, t in streams.flush()]
    client = "".join(sent)
    assert GHP[k:] not in client and GHP[k + 4:] not in client
    if with_spool:
        kept = read_all(tmp_path / "output", 1, 0, MAX_PAGE)
        assert GHP[k:] not in kept and GHP[k + 4:] not in kept
