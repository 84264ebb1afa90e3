"""Images sized for a model, on real jailed kernels (warden, gate, nsjail, ipykernel) through
the Sandbox: a dpi=300 matplotlib figure reaches the agent within its image budget; a raw
oversized PNG (IPython.display.Image, past matplotlib) and a figure the kernel was not let
fit are replaced by the gate's note; the analyst profile gets the full-size figure."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from cellblock.output.imagehead import image_size
from cellblock.policy import load_policy
from cellblock.sandbox import Sandbox

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.timeout(240)]

FIGURE = """
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(10, 6), dpi=300)
plt.plot(range(100), [i * i % 37 for i in range(100)])
plt.title("dpi=300")
"""
# The PNG matplotlib makes of the same figure at its own dpi, shown past the figure formatter.
RAW_PNG = FIGURE + """
import io
from IPython.display import Image, display
buf = io.BytesIO()
fig.savefig(buf, format="png", dpi=300)
plt.close(fig)
display(Image(data=buf.getvalue(), format="png"))
"""
# A formatter the kernel does not fit: the figure's own printer, straight to display.
PAST_THE_KERNEL = FIGURE + """
from IPython.core.pylabtools import print_figure
from IPython.display import display
display({"image/png": print_figure(fig, "png", base64=True), "text/plain": "<raw>"}, raw=True)
plt.close(fig)
"""


def png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def images(result: Any) -> list[str]:
    return [o.data["image/png"] for o in result.outputs if "image/png" in o.data]


async def test_a_dpi_300_figure_reaches_the_agent_within_budget(
        jupyter_env: dict[str, str]) -> None:
    budget = load_policy().profile("agent").output
    async with Sandbox("agent") as sb:
        r = await sb.run(FIGURE)
        assert r.ok, r.error
        (png,) = images(r)
        width, height = png_size(png)
        assert max(width, height) <= budget.image_max_side
        assert width * height <= budget.image_max_pixels
        assert len(base64.b64decode(png)) <= budget.image_max_bytes
        assert width >= 1000  # fitted, not shrunk to a thumbnail
        assert abs(width / height - 10 / 6) < 0.15  # the tight bbox trims a little
        assert "withheld" not in r.policy.summary()


async def test_a_raw_oversized_png_and_an_unfitted_figure_become_the_note(
        jupyter_env: dict[str, str]) -> None:
    async with Sandbox("agent") as sb:
        for code in (RAW_PNG, PAST_THE_KERNEL):
            r = await sb.run(code)
            assert r.ok, r.error
            assert images(r) == []
            (shown,) = [o.data for o in r.outputs]
            note = shown["text/plain"]
            assert "withheld image/png 3000x1800 px, " in note or \
                "withheld image/png 2" in note, note  # tight bbox: about 2600x1600
            assert "over this profile's image budget: 1,568 px long side, 1,150,000 " \
                "pixels, 307,200 bytes; fits at " in note
            assert "fig.set_size_inches(...) or a lower dpi" in note
            withheld = note.split("[cellblock: withheld ", 1)[1].removesuffix("]")
            assert [n for n in r.policy.notes if "image budget" in n] == [withheld]


NOISE = """
import numpy as np
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 8), dpi=150)
ax.imshow(np.random.default_rng(0).random((800, 800, 3)))
"""


async def test_a_figure_over_the_byte_budget_is_rendered_smaller(
        jupyter_env: dict[str, str]) -> None:
    """Noise does not compress: at 1.15 MP it is ~3 MB of PNG; the kernel lowers the dpi
    until the bytes fit too."""
    budget = load_policy().profile("agent").output
    async with Sandbox("agent") as sb:
        r = await sb.run(NOISE)
        assert r.ok, r.error
        (png,) = images(r)
        raw = base64.b64decode(png)
        assert len(raw) <= budget.image_max_bytes
        assert len(raw) > budget.image_max_bytes // 2  # not shrunk far past the budget
        width, height = png_size(png)
        assert width * height <= budget.image_max_pixels


@pytest.mark.profile("analyst")
async def test_the_analyst_gets_the_figure_full_size(jupyter_env: dict[str, str]) -> None:
    async with Sandbox("analyst") as sb:
        r = await sb.run(FIGURE)
        assert r.ok, r.error
        (png,) = images(r)
        width, height = image_size("image/png", base64.b64decode(png))
        assert width > 2000 and height > 1200, (width, height)
