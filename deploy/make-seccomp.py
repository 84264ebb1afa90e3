#!/usr/bin/env python3
"""Write deploy/seccomp.json: podman's default seccomp profile plus exactly what nsjail
needs to build a jail inside a container, and nothing else.

    python3 deploy/make-seccomp.py [/usr/share/containers/seccomp.json] > deploy/seccomp.json

What nsjail calls to make a jail, and where the runtime default stands:

- clone with CLONE_NEWUSER|NEWNS|NEWPID|NEWIPC|NEWUTS|NEWNET|NEWCGROUP, unshare, mount,
  umount2, pivot_root: allowed by podman's default without conditions (podman relies on
  capabilities for them); containerd's and Docker's RuntimeDefault allow them only with
  CAP_SYS_ADMIN. This profile allows them unconditionally, so no capability is needed.
- sethostname (nsjail names the jail's UTS namespace): the runtime default allows it only
  with CAP_SYS_ADMIN; this profile allows it unconditionally. It changes the hostname of
  a UTS namespace nsjail just made, never the container's.

Every other rule is the default's, unchanged. The output is deterministic (the same input
gives the same bytes), so `git diff` shows what a newer default changes.
"""

from __future__ import annotations

import json
import sys

DEFAULT = "/usr/share/containers/seccomp.json"
# Allowed without conditions; every one of them is needed by nsjail (see above).
NSJAIL_NEEDS = ("clone", "mount", "pivot_root", "sethostname", "umount2", "unshare")


def derive(profile: dict) -> dict:
    rules = []
    for rule in profile["syscalls"]:
        names = [n for n in rule["names"] if n not in NSJAIL_NEEDS]
        conditional = rule.get("includes") or rule.get("excludes") or rule.get("args")
        if names != rule["names"] and conditional:
            # a cap- or argument-gated rule for one of ours: ours is unconditional below
            if not names:
                continue
            rule = {**rule, "names": names}
        rules.append(rule)
    rules.append({
        "names": list(NSJAIL_NEEDS),
        "action": "SCMP_ACT_ALLOW",
        "comment": "cellblock: what nsjail needs to build a jail (deploy/make-seccomp.py)",
    })
    return {**profile, "syscalls": rules}


def main(argv: list[str]) -> int:
    with open(argv[1] if len(argv) > 1 else DEFAULT) as f:
        profile = json.load(f)
    json.dump(derive(profile), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
