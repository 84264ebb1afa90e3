"""Images sized for a model, through ``cellblock mcp`` and the MCP SDK's own stdio client: a
dpi=300 figure comes back as one ``ImageContent`` within the agent's image budget, an
oversized raw PNG as the gate's note in text, and no base64 ever inside a TextContent."""

from __future__ import annotations

import base64
import re

import pytest
from mcp.types import ImageContent, TextContent
from test_images_jail import FIGURE, RAW_PNG
from test_mcp import session, texts

from cellblock.output.imagehead import image_size
from cellblock.policy import load_policy

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.timeout(240)]

BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}")


async def test_figures_are_image_content_within_budget(jupyter_env: dict[str, str]) -> None:
    budget = load_policy().profile("agent").output
    async with session(jupyter_env, "--profile", "agent") as client:
        r = await client.call_tool("run_python", {"code": FIGURE})
        assert not r.is_error, texts(r)
        (image,) = [c for c in r.content if isinstance(c, ImageContent)]
        assert image.mime_type == "image/png"
        assert texts(r) == "Text(0.5, 1.0, 'dpi=300')"  # the last expression; no base64
        raw = base64.b64decode(image.data, validate=True)
        width, height = image_size("image/png", raw)
        assert max(width, height) <= budget.image_max_side
        assert width * height <= budget.image_max_pixels
        assert len(raw) <= budget.image_max_bytes

        r = await client.call_tool("run_python", {"code": RAW_PNG})
        assert not r.is_error, texts(r)
        assert all(isinstance(c, TextContent) for c in r.content)
        text = texts(r)
        assert "withheld image/png 3000x1800 px, " in text
        assert "fig.set_size_inches(...) or a lower dpi" in text
        assert not BASE64_RUN.search(text)
