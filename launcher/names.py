"""The names cellblock turns into paths: kernel ids and dataset names, checked in one place.

A kernel id becomes a run dir (``<runtime>/<id>``), a cgroup (``<parent>/<id>``) and an
audit file (``<id>.jsonl``); jupyter_client makes UUIDs, but Jupyter Server accepts a
client-chosen ``kernel_id`` in ``POST /api/kernels``. A dataset name becomes a mount point
(``/data/<name>``). Both are checked wherever they become a name, against the patterns
here (the dataset pattern is the jail side's, :data:`cellblock_kernel.datasets.NAME_RE`,
so the broker's wire format stays defined once).

Who calls it: the provisioner (before anything starts), the run dir, the audit log, the
cgroups and the jail command builder.
"""

from __future__ import annotations

import re

from cellblock_kernel.datasets import NAME_RE as DATASET_NAME

from .errors import BadKernelId

__all__ = ["DATASET_NAME", "KERNEL_ID", "check_kernel_id"]

#: a UUID, a pool slot (``pool-<hex>``) or any short name: no dot, no slash, no leading dash
KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_kernel_id(kernel_id: object) -> str:
    """``kernel_id`` if it is a usable name, else BadKernelId naming it and the rule."""
    if not isinstance(kernel_id, str) or not KERNEL_ID.fullmatch(kernel_id):
        shown = repr(kernel_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise BadKernelId(
            f"cellblock: kernel id {shown} is not allowed: it becomes a directory, cgroup "
            "and file name, so it must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-', "
            "starting with a letter or digit (a UUID is fine)")
    return kernel_id
