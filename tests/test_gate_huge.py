"""Honest huge output through a real jailed kernel (issue 13, finding 8): a 100 MB print
on the agent and the analyst profile reaches the client as head + marker + tail, never as
nothing (cellblock_kernel splits big stream writes into messages of bounded size, the gate
keeps the head, counts the rest and sends the tail). No timing assertions: the duration is
printed for the report (``-s``)."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from test_budgets import run

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]


@pytest.mark.parametrize("profile", [
    pytest.param("agent", marks=pytest.mark.profile("agent")),
    pytest.param("analyst", marks=pytest.mark.profile("analyst")),
])
async def test_a_100_mb_print_gets_head_marker_and_tail(kernel: Any, profile: str) -> None:
    _km, kc = kernel
    start = time.monotonic()
    out = await run(kc, "print('x' * 50_000_000 + 'y' * 50_000_000)", timeout=300)
    took = time.monotonic() - start
    text = out["stdout"]
    assert out["errors"] == [] and out["reply"]["status"] == "ok"
    assert text.startswith("x" * 1000) and text.endswith("y" * 1000 + "\n")
    markers = re.findall(r"(\[cellblock [0-9a-f]{6}: ([\d,]+) bytes of (\w+) truncated"
                         r"(?:; the rest is kept: [^\]]*)?\])", text)
    assert len(markers) == 1, text[-600:]
    cut = int(markers[0][1].replace(",", ""))
    assert len(text.encode()) - len(markers[0][0]) < 100_000_001 - cut + 10
    assert len(text) < 4_000_000
    print(f"\n{profile}: 100 MB print, {took:.2f} s to idle, {len(text)} characters received")
