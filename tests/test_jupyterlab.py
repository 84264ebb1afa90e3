"""An analyst in JupyterLab, end to end, in a real browser.

Starts `jupyter lab` on 127.0.0.1 (token, a free port, the test session's kernelspecs) and
drives Debian's chromium (/usr/bin/chromium, installed by .ci/install) with Playwright,
which cannot download a browser of its own here. One session walks what a person does:
the cellblock kernels are in the launcher; a notebook opens on `cellblock-analyst`; a cell
runs and shows its output; a planted secret shows redacted in the rendered output; a
running cell is stopped with the toolbar's interrupt button and the kernel keeps its state;
the toolbar's restart (dialog accepted) gives a fresh kernel whose old variables are gone.
Screenshots of each step go to test-artifacts/jupyterlab/.

Chromium runs with --no-sandbox: as root it refuses to start otherwise, and the page it
shows is our own JupyterLab on loopback. The same flags work unprivileged, so the test also
runs in the unprivileged pass (marked ``nonroot``; checked as user cbtest the way .ci/test
runs it). Kernels are stopped by stopping JupyterLab, which shuts them down, then
``no_leftovers`` checks that nothing of them survived.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import BIN, REPO, free_port, jupyter_app

pytestmark = [pytest.mark.jail, pytest.mark.nonroot]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these chromium keeps calling home, and the closed network refuses each call.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts" / "jupyterlab"
TOKEN = uuid.uuid4().hex
TIMEOUT_MS = 120_000  # kernels start on a busy 2-core machine; every wait is on a condition
# No news or update checks: a popup over the notebook, and a request to the internet.
NO_NEWS = {"fetchNews": "false", "checkForUpdates": False}


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def run_cell(page: Any, code: str) -> Any:
    """Type ``code`` into the notebook's last cell, run it, return that cell (by index:
    running the last cell adds a new one below, which `.last` would then mean)."""
    from playwright.sync_api import expect

    cells = page.locator(".jp-Notebook .jp-CodeCell")
    cell = cells.nth(cells.count() - 1)
    expect(cell.locator(".cm-content")).to_have_text("")  # the fresh cell, not the last run
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.locator('[data-command="notebook:run-cell-and-select-next"]').click()
    return cell


@pytest.fixture
def lab(tmp_path: Path, no_leftovers: None) -> Iterator[tuple[str, Path]]:
    """A JupyterLab on 127.0.0.1 serving an empty directory; yields its base URL and log.
    Requesting ``no_leftovers`` first makes its check run after JupyterLab stopped (which
    shuts its kernels down)."""
    root = tmp_path / "notebooks"
    root.mkdir()
    settings = tmp_path / "settings"
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps(NO_NEWS))
    port = free_port()
    argv = [str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
            *(["--allow-root"] if os.geteuid() == 0 else [])]
    with jupyter_app(argv, port, TOKEN, tmp_path, "jupyterlab"):
        yield f"http://127.0.0.1:{port}", tmp_path / "jupyterlab.log"


@pytest.mark.timeout(900)
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/install)")
def test_analyst_in_jupyterlab(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("0*.png"):
        old.unlink()
    expect.set_options(timeout=TIMEOUT_MS)
    url, log = lab

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{url}/lab?token={TOKEN}")

            # The launcher shows a tile per cellblock profile.
            notebooks = page.locator('.jp-LauncherCard[data-category="Notebook"]')
            analyst = notebooks.filter(has_text="Python (cellblock: analyst)")
            expect(analyst).to_have_count(1)
            expect(notebooks.filter(has_text="Python (cellblock: agent)")).to_have_count(1)
            shot(page, "01-launcher")

            # A notebook on cellblock-analyst; wait until its kernel is idle.
            analyst.click()
            status = page.locator(".jp-Notebook-ExecutionIndicator")
            expect(page.locator(".jp-KernelName")).to_have_text("Python (cellblock: analyst)")
            expect(status).to_have_attribute("data-status", "idle")
            shot(page, "02-notebook")

            # A cell runs and its output shows.
            cell = run_cell(page, 'x = 6 * 7\nprint("answer", x)')
            expect(cell.locator(".jp-OutputArea-output")).to_have_text("answer 42")
            shot(page, "03-output")

            # A planted secret is redacted in what the browser renders. The source builds it
            # from two halves, so the whole secret can only appear through the output.
            # (a fake in the key id format: AWS's documented AKIAIOSFODNN7EXAMPLE is left
            # alone as an example key since issue 14)
            secret = "AKIA" + "QWERTYUIOPASDFGH"
            cell = run_cell(page, 'print("key:", "AKIA" + "QWERTYUIOPASDFGH")')
            output = cell.locator(".jp-OutputArea-output")
            expect(output).to_have_text("key: [REDACTED:aws-access-key-id]")
            assert secret not in output.inner_text()
            assert secret not in page.content()
            shot(page, "04-redacted")

            # The toolbar's interrupt stops a running cell; the kernel keeps its state.
            # The cell says when it is in its sleep: interrupting earlier would test less.
            cell = run_cell(page, 'import time\nprint("sleeping", flush=True)\ntime.sleep(600)')
            expect(cell.locator(".jp-InputPrompt")).to_have_text("[*]:")
            expect(cell.locator(".jp-OutputArea-output").first).to_have_text("sleeping")
            expect(status).to_have_attribute("data-status", "busy")
            shot(page, "05-running")
            page.locator('[data-command="notebook:interrupt-kernel"]').click()
            expect(cell.locator(".jp-OutputArea")).to_contain_text("KeyboardInterrupt")
            expect(cell.locator(".jp-InputPrompt")).to_have_text("[3]:")
            expect(status).to_have_attribute("data-status", "idle")
            cell = run_cell(page, 'print("still here", x)')
            expect(cell.locator(".jp-OutputArea-output")).to_have_text("still here 42")
            shot(page, "06-interrupted")

            # The toolbar's restart, dialog accepted: a fresh kernel without the old `x`.
            page.locator('[data-command="notebook:restart-kernel"]').click()
            dialog = page.locator(".jp-Dialog")
            expect(dialog).to_contain_text("Restart")
            shot(page, "07-restart-dialog")
            accept = dialog.locator("button.jp-mod-accept")
            expect(accept).to_have_text("Restart")
            accept.click()
            expect(dialog).to_have_count(0)
            expect(status).to_have_attribute("data-status", "idle")
            cell = run_cell(page, 'print("x" in globals(), "after restart")')
            expect(cell.locator(".jp-OutputArea-output")).to_have_text("False after restart")
            expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:")
            shot(page, "08-restarted")
        except Exception as e:
            shot(page, "failure")
            raise AssertionError(f"{e}\n--- {log.name} (end) ---\n{log.read_text()[-4000:]}"
                                 ) from e
        finally:
            browser.close()


#: Markdown an agent-profile kernel displays, each naming `HOST` in a form the regular
#: expression that neutralised URLs before issue 13 let through, and JupyterLab fetches
#: (the page is http://127.0.0.1, so ``https:HOST/x`` goes to ``https://HOST/x``).
HOSTILE_MARKDOWN = [
    "![a](https&#58;//{host}/a.png)",
    "![b](https:{host}/b.png)",
    "![c](/\\\\{host}/c.png)",
    '<img src="ht&#9;tps://{host}/d.png">',
    '<img src="x.png" srcset="https:{host}/e.png 2x">',
    "<span style=\"background-image:url('https:{host}/f.png')\">styled</span>",
    "[r]: https:{host}/g.png\n\n![g][r]",
    '<img src="\\\\\\\\{host}\\\\h.png">',
]


@pytest.mark.timeout(900)
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/install)")
def test_agent_markdown_fetches_nothing_remote(lab: tuple[str, Path]) -> None:
    """Issue 13, finding 6, where it matters: hostile markdown from a `cellblock-agent` kernel
    rendered by JupyterLab in Chromium. Every request the page makes while it renders them
    is recorded; none may leave 127.0.0.1. A local image in the same output is requested
    (so the recorder sees what the outputs fetch), and the rendered text is checked too."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=TIMEOUT_MS)
    url, log = lab
    host = "exfil.invalid"  # never resolves: a request to it is recorded, then fails
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{url}/lab?token={TOKEN}")
            agent = page.locator('.jp-LauncherCard[data-category="Notebook"]').filter(
                has_text="Python (cellblock: agent)")
            agent.click()
            expect(page.locator(".jp-KernelName")).to_have_text("Python (cellblock: agent)")
            status = page.locator(".jp-Notebook-ExecutionIndicator")
            expect(status).to_have_attribute("data-status", "idle")

            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            shown = [md.format(host=host) for md in HOSTILE_MARKDOWN]
            code = ("from IPython.display import Markdown, display\n"
                    f"for md in {shown!r}:\n    display(Markdown(md))\n"
                    "display(Markdown('![local](local-probe.png)'))")
            cell = run_cell(page, code)
            outputs = cell.locator(".jp-OutputArea-output")
            expect(outputs).to_have_count(len(shown) + 1)
            expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:")
            # Rendered, and every image has finished (loaded or failed): then no request
            # is still to come from them.
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-OutputArea-output img')]"
                ".every(img => img.complete)")
            page.wait_for_load_state("networkidle")
            shot(page, "10-agent-markdown")
            expect(outputs.last.locator("img")).to_have_count(1)
            assert any("local-probe.png" in u for u in requests), requests
            remote = [u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                      and urlsplit(u).hostname != "127.0.0.1"]
            assert remote == [], remote
            sources = page.eval_on_selector_all(
                ".jp-OutputArea-output img", "imgs => imgs.map(i => i.currentSrc || i.src)")
            assert not [s for s in sources if host in s], sources
        except Exception as e:
            shot(page, "failure-agent-markdown")
            raise AssertionError(f"{e}\n--- {log.name} (end) ---\n{log.read_text()[-4000:]}"
                                 ) from e
        finally:
            browser.close()
