"""Everything about one kernel's host processes, from the client's process to the jail.

::

    client process (Jupyter Server, an LLM backend, nbclient)
      client.SpawnerClient ── request ──> spawner (python -m cellblock.warden.spawner)
      client.WardenProcess <── status ──   │ fork()
                                           v
                                 life.run_forked ── Warden (warden.py) ── jail.JailProcess
                                                      │                    (nsjail, kernel)
                                                      └── the gate (cellblock.gate)

Modules, one concern each:

- :mod:`~cellblock.warden.request`: the :class:`LaunchRequest`, built once by the
  provisioner (or the Sandbox) and carried as one JSON line to the warden.
- :mod:`~cellblock.warden.channel`: the JSON-line framing and descriptor passing they share.
- :mod:`~cellblock.warden.client`: the client side: starts the spawner once per process,
  holds each warden as a ``Popen``-like :class:`WardenProcess`; :func:`warm` fills a pool.
- :mod:`~cellblock.warden.spawner`: forks one warden per launch and keeps the warm pool.
- :mod:`~cellblock.warden.life`: a forked warden's life, from ``fork()`` to its exit.
- :mod:`~cellblock.warden.warden`: the :class:`Warden`, which owns one kernel's jail, gate,
  budgets and cleanup; :mod:`~cellblock.warden.jail`: the nsjail process itself and why it
  ended; :mod:`~cellblock.warden.process`: titles, stop signals, pdeathsig, rlimits.

Importing this package imports none of them (the spawner imports what a warden needs once,
before it forks).
"""
