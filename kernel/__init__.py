"""cellblock_kernel: the code that runs inside the jail.

It starts ipykernel over ipc sockets in the jail's run dir. It imports only the
standard library, ipykernel and pyzmq, and never ``cellblock`` (the host side);
a test enforces that. Nothing here is a security control: everything inside the
jail is assumed hostile, and enforcement lives outside it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
