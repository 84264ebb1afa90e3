"""cellblock: a Jupyter kernel provisioner that runs every kernel inside nsjail.

Host side. The provisioner (:mod:`cellblock.provisioner`) starts one warden per
kernel (:mod:`cellblock.warden`), which owns the jail and runs the gate
(:mod:`cellblock.gate`) between the client and the kernel. See docs/ for the
threat model and the policy reference.
"""

__version__ = "0.1.0"
