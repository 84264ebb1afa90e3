"""The warden's egress proxy, for profiles whose ``[profiles.NAME.network] allow`` is not
empty (docs/network.md). The jail has its own network namespace with loopback only and no
resolver; the kernel's loopback forwarder (:mod:`cellblock_kernel.egress`) hands every
connection to the proxy's unix socket in the run dir, and the proxy decides:

- :mod:`.hosts`: the allowlist, matched on the normalised host and port;
- :mod:`.addresses`: which resolved addresses are never reachable (loopback, private,
  link-local, metadata, ...);
- :mod:`.resolver`: the proxy's own name resolution (the host's resolver, or a test file);
- :mod:`.httphead`: a bounded parse of the request line and headers;
- :mod:`.sni`: the server name of a TLS ClientHello, parsed with bounds;
- :mod:`.proxy`: the server, its budgets, the lock, and the audit of every connection.

This package file imports nothing, so :mod:`cellblock.policy` can use :mod:`.hosts`.
"""
