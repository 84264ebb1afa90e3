"""Files between a client and a jailed kernel (issue 16): a per-kernel inbox and outbox.

- **Inbox**: the client (never the kernel) uploads into ``<run dir>/inbox``, bound read-only
  at ``/inbox`` in the jail (:mod:`.inbox`): names checked, caps per profile, each file
  written beside it and renamed in whole. In the jail: ``from cellblock_kernel import files``.
- **Outbox**: the jail writes ``/outbox``, a tmpfs capped in bytes and inodes; the warden
  reads it without following anything the jail controls (:mod:`.outbox`) and sends text
  redacted by the profile's output policy, images as checked bytes (:mod:`.service`).
- Clients (:mod:`.client`; Sandbox, MCP, REST, CLI) ask the kernel's warden over
  ``<run dir>/files.sock`` (:mod:`.wire`). Every transfer and refusal is audited.

The policy is ``[profiles.NAME.files]`` (:class:`cellblock.policy.FilesPolicy`,
docs/policy.md).
"""

from .client import DownloadedFile, download, inbox, outbox, upload

__all__ = ["DownloadedFile", "download", "inbox", "outbox", "upload"]
