"""Matplotlib figures rendered to fit the profile's image budget, inside the jail.

On a profile with an image budget (``image_max_side``, ``image_max_pixels``,
``image_max_bytes``), the warden passes it to this kernel on its command line
(``--CellblockKernelApp.image_max_side=1568`` ...), and :func:`install` replaces IPython's
``image/png`` and ``image/jpeg`` formatters with ones that render a figure at the dpi that
makes it fit: ``plt.figure(figsize=(10, 6), dpi=300)`` (3000x1800) reaches the client at
1384x830 instead of being withheld. The figure's printer (matplotlib-inline's, with its
``bbox_inches`` and other keywords) is kept; only its ``dpi`` is lowered, then lowered again
from the measured result (a tight bounding box or a dense plot can still be over), a few
times at most.

This is a convenience, never a control: the gate checks every image against the budget
whatever made it (``cellblock.output.imagefit``), so an image that still does not fit, or
one displayed another way (``IPython.display.Image``), reaches the client as a note.
"""

from __future__ import annotations

import base64
import io
import math
import sys
from typing import Any, NamedTuple

from IPython.core.formatters import JPEGFormatter, PNGFormatter

__all__ = ["ImageBudget", "fit_scale", "install"]

#: renders of one figure at most before its last one is sent as it is (the gate decides)
MAX_RENDERS = 5


class ImageBudget(NamedTuple):
    """The profile's image budget; 0 turns one limit off."""

    max_side: int = 0
    max_pixels: int = 0
    max_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_side or self.max_pixels or self.max_bytes)


def fit_scale(width: float, height: float, nbytes: int, budget: ImageBudget) -> float:
    """How much a render of ``width`` x ``height`` pixels and ``nbytes`` bytes may be scaled
    (in each dimension) to just fit the budget: under 1 when it is over, over 1 when there is
    room (``inf`` with no budget). Bytes grow roughly with the area, hence the square root."""
    scale = math.inf
    if budget.max_side:
        scale = min(scale, budget.max_side / max(width, height))
    if budget.max_pixels:
        scale = min(scale, math.sqrt(budget.max_pixels / (width * height)))
    if budget.max_bytes and nbytes:
        scale = min(scale, math.sqrt(budget.max_bytes / nbytes))
    return scale


def _size(data: bytes) -> tuple[int, int]:
    from PIL import Image  # matplotlib depends on Pillow: wherever a figure is, so is PIL

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _raw(rendered: Any) -> bytes:
    return base64.b64decode(rendered) if isinstance(rendered, str) else bytes(rendered)


def _render(fig: Any, printer: Any, budget: ImageBudget) -> Any:
    """What `printer` (the registered figure printer) makes of `fig`, at the largest dpi up
    to the figure's own that fits: first from the figure's size in inches, then from the
    measured render (a tight bounding box trims or grows it; bytes are only known after), 2%
    under so that rounding does not land just over. The last render that fits is returned,
    else the last one (the gate then withholds it, saying why)."""
    keywords = getattr(printer, "keywords", {}) or {}
    wanted = float(keywords.get("dpi") or fig.dpi)
    wanted *= 2 if keywords.get("fmt") == "retina" else 1
    width_in, height_in = fig.get_size_inches()
    dpi = wanted * min(1.0, 0.98 * fit_scale(width_in * wanted, height_in * wanted, 0, budget))
    rendered = fitting = None
    grown = False
    for _ in range(MAX_RENDERS):
        rendered = printer(fig, dpi=dpi)
        if rendered is None:  # an empty figure: nothing to show
            return None
        raw = _raw(rendered)
        width, height = _size(raw)
        scale = fit_scale(width, height, len(raw), budget)
        if scale < 1.0:
            dpi *= 0.98 * scale
            continue
        fitting = rendered
        better = min(wanted, dpi * 0.98 * scale)
        if grown or better < dpi * 1.05:
            break
        dpi, grown = better, True  # room left: once more, larger
    return fitting if fitting is not None else rendered


def _figure_class() -> Any:
    module = sys.modules.get("matplotlib.figure")
    return getattr(module, "Figure", None)


class _Fitting:
    """A formatter that renders a matplotlib Figure to fit `budget`, everything else as its
    base class does."""

    budget = ImageBudget()

    def __call__(self, obj: Any) -> Any:
        figure = _figure_class()
        if figure is None or not isinstance(obj, figure):
            return super().__call__(obj)  # type: ignore[misc]
        try:
            printer = self.lookup(obj)  # type: ignore[attr-defined]
        except KeyError:  # this format is not one of the figure formats selected
            return super().__call__(obj)  # type: ignore[misc]
        try:
            return _render(obj, printer, self.budget)
        except Exception:  # the gate still checks what the stock printer makes
            return super().__call__(obj)  # type: ignore[misc]


class FittingPNGFormatter(_Fitting, PNGFormatter):
    """``image/png`` with figures fitted."""


class FittingJPEGFormatter(_Fitting, JPEGFormatter):
    """``image/jpeg`` with figures fitted."""


def install(shell: Any, budget: ImageBudget) -> None:
    """Fit figures to `budget` in `shell`'s ``image/png`` and ``image/jpeg`` formatters (the
    printers already registered, and those matplotlib-inline registers later, are kept)."""
    if not budget:
        return
    display = shell.display_formatter
    for cls in (FittingPNGFormatter, FittingJPEGFormatter):
        old = display.formatters[cls.format_type.default_value]
        new = cls(parent=display)
        new.budget = budget
        new.type_printers = old.type_printers
        new.deferred_printers = old.deferred_printers
        new.singleton_printers = old.singleton_printers
        new.enabled = old.enabled
        display.formatters[cls.format_type.default_value] = new
