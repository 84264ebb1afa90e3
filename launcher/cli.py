"""The ``cellblock`` command.

    cellblock install [--user | --sys-prefix | --prefix DIR]   one kernelspec per profile
    cellblock doctor [PROFILE ...]                             check the host, with fixes
    cellblock profiles list
    cellblock profiles show NAME                               resolved policy + nsjail argv
    cellblock run [NOTEBOOK] [--profile NAME] [--output PATH] [--datasets a,b]
                                                               execute a notebook jailed
    cellblock grant KERNEL DATASET                             grant an allowed dataset now
    cellblock revoke KERNEL DATASET                            refuse its future opens
    cellblock net lock KERNEL                                  close its network allowlist
    cellblock ps [--json]                                      running sandboxes
    cellblock audit [--kernel ID] [--event GLOB] [--since T] [--follow] [--json] [--schema]
    cellblock kill KERNEL... | --all | --profile NAME [--reason TEXT]   the kill switch
    cellblock mcp [--profile NAME] [--datasets a,b]             an MCP server on stdio

Exit status: 0 success, 1 a check or a notebook failed, 2 bad input (the message
names the bad value and what is allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_output import add_output_command
from .errors import CellblockError, JailStartError

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["format_command", "main"]


def _cmd_install(args: argparse.Namespace) -> int:
    from .kernelspec import install_all
    from .policy import load_policy

    prefix = sys.prefix if args.sys_prefix else args.prefix
    for path in install_all(load_policy(), user=args.user, prefix=prefix):
        print(f"installed {Path(path).name} in {path}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_checks
    from .policy import load_policy

    policy = load_policy()
    for name in args.profiles:
        policy.profile(name)
    checks = run_checks(policy, args.profiles or None)
    for c in checks:
        print(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            print(f"       fix: {c.fix}")
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


def format_command(argv: list[str]) -> str:
    """``argv`` as a shell command, one option and its value per line.

    The program and each ``--flag value`` pair go on their own line, continued with
    a backslash; everything from ``--`` on (the command run inside the jail) is one
    line. Every arg is shell-quoted, so the text can be pasted into a shell.
    """
    if not argv:
        return ""
    lines = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            lines.append(shlex.join(argv[i:]))
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-") and "=" not in arg and nxt is not None \
                and not nxt.startswith("-"):
            lines.append(f"{shlex.quote(arg)} {shlex.quote(nxt)}")
            i += 2
        else:
            lines.append(shlex.quote(arg))
            i += 1
    return " \\\n    ".join(lines)


def _example_command(policy: Policy, name: str) -> list[str]:
    """The command a warden would run for a kernel of ``name`` (the profile's default
    directory datasets aside), with KERNEL_ID for the run dir and the first jail uid."""
    from .jailcmd import jail_command, run_dir_layout
    from .jailuids import jail_uid_range
    from .rundir import runtime_base

    first = jail_uid_range(policy.host.jail_uids)[0] if os.geteuid() == 0 else 0
    uid = first if os.geteuid() == 0 else os.getuid()
    gid = first if os.geteuid() == 0 else os.getgid()
    return jail_command(policy, name, run_dir_layout(runtime_base() / "KERNEL_ID", uid, gid))


def _cmd_profiles(args: argparse.Namespace) -> int:
    from .policy import load_policy

    policy = load_policy()
    if args.action == "list":
        for name, prof in sorted(policy.profiles.items()):
            print(f"{name:<16} {prof.display_name or ''}  {prof.description}")
        print(f"(policy from: {' + '.join(policy.sources)})")
        return 0
    profile = policy.profile(args.name)
    argv = _example_command(policy, args.name)
    shown: dict[str, Any] = {
        "profile": args.name,
        "policy_sources": list(policy.sources),
        "policy_sha256": policy.digest(),
        "host": policy.host.model_dump(mode="json"),
        "settings": profile.model_dump(mode="json"),
        "nsjail_command": argv,
    }
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    print(f"profile {args.name}  (policy: {' + '.join(policy.sources)}, "
          f"sha256 {shown['policy_sha256'][:16]})")
    for key, value in shown["settings"].items():
        if isinstance(value, dict):
            for k2, v2 in value.items():
                print(f"  {key}.{k2} = {json.dumps(v2)}")
        else:
            print(f"  {key} = {json.dumps(value)}")
    print("nsjail command (run dir and uid are chosen per kernel):")
    print("  " + format_command(argv))
    return 0


def _run_datasets(args: argparse.Namespace, policy: Policy) -> tuple[str, ...] | None:
    """The datasets ``cellblock run`` asks for: ``--datasets``, else for the embedded
    quickstart the built-in ``sample``, else None ($CELLBLOCK_DATASETS or the defaults)."""
    from .datasets import parse_selection
    from .policy import SAMPLE_DATASET
    from .sandbox import check_launch

    if args.datasets is not None:
        chosen = parse_selection(args.datasets)
    elif args.notebook is None:
        profile = policy.profile(args.profile)
        if SAMPLE_DATASET not in profile.datasets:
            raise CellblockError(
                f"the embedded quickstart reads the built-in dataset {SAMPLE_DATASET!r}, which "
                f"profile {args.profile!r} does not allow (it allows: "
                f"{', '.join(profile.datasets) or 'none'}); add it to "
                f"profiles.{args.profile}.datasets, or run a notebook of your own")
        chosen = (SAMPLE_DATASET,)
    else:
        return None
    check_launch(policy, args.profile, chosen)  # names the dataset and what is allowed
    return chosen


def _cmd_run(args: argparse.Namespace) -> int:
    from .notebook_run import read_notebook, run_notebook
    from .policy import load_policy

    policy = load_policy()
    policy.profile(args.profile)  # an unknown profile is bad input: say so first
    datasets = _run_datasets(args, policy)
    if args.notebook is None:
        source = resources.files("cellblock.notebooks").joinpath("quickstart.ipynb")
        if not source.is_file():
            raise CellblockError("this installation has no embedded quickstart.ipynb; "
                                 "give a notebook path: cellblock run NOTEBOOK")
        src_name, text = "quickstart.ipynb", source.read_text()
    else:
        path = Path(args.notebook)
        if not path.is_file():
            raise CellblockError(f"notebook {str(path)!r} does not exist (give the path of "
                                 "an .ipynb file)")
        try:
            src_name, text = path.name, path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CellblockError(f"notebook {str(path)!r} cannot be read: {exc}") from None
    nb = read_notebook(text, src_name if args.notebook is None else str(args.notebook))
    if args.output:
        output = Path(args.output)
    elif args.notebook is None:
        output = Path.cwd() / "quickstart.executed.ipynb"
    else:
        output = Path(src_name).with_suffix(".executed.ipynb")
    if not output.parent.is_dir():
        raise CellblockError(f"--output {str(output)!r}: directory {str(output.parent)!r} "
                             "does not exist")
    started = time.monotonic()
    summary = run_notebook(nb, profile=args.profile, output=output, timeout=args.timeout,
                           datasets=datasets)
    took = time.monotonic() - started
    print(f"{src_name}: {summary.cells} code cells on profile {args.profile!r} in {took:.1f} s; "
          f"{summary.errors} with errors; written to {output}")
    if summary.first_error:
        print(f"first error: {summary.first_error}")
    for line in summary.details():
        print(line)
    return 1 if summary.errors else 0


def _cmd_mcp(args: argparse.Namespace) -> int:
    from .mcp_server import main as serve_mcp

    return serve_mcp(args.profile, args.datasets)


def _cmd_grant(args: argparse.Namespace) -> int:
    from .grants import operator_request

    print(operator_request(args.kernel, args.command, args.dataset))
    return 0


def _cmd_net(args: argparse.Namespace) -> int:
    from .egress.control import lock_network

    print(lock_network(args.kernel))
    return 0


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cmd_ps(args: argparse.Namespace) -> int:
    from .policy import human_bytes
    from .running import list_running

    rows = list_running()
    if args.json:
        print(json.dumps([{
            "kernel_id": s.kernel_id, "profile": s.record.profile, "state": s.record.state,
            "age_seconds": round(s.age(), 3), "memory_bytes": s.memory,
            "warden_pid": s.record.warden_pid, "nsjail_pid": s.record.nsjail_pid,
        } for s in rows], indent=2))
        return 0
    print(f"{'KERNEL':<36}  {'PROFILE':<12} {'AGE':>8} {'MEMORY':>10}  STATE")
    for s in rows:
        memory = human_bytes(s.memory) if s.memory is not None else "-"
        print(f"{s.kernel_id:<36}  {s.record.profile:<12} {_age(s.age()):>8} {memory:>10}  "
              f"{s.record.state}")
    return 0


def _cmd_kill(args: argparse.Namespace) -> int:
    from .running import find, list_running, stop, wait_gone

    running = list_running()
    if args.all:
        chosen = running
    elif args.profile:
        chosen = [s for s in running if s.record.profile == args.profile]
    elif args.kernels:
        chosen = list({id(s): s for s in (find(running, k) for k in args.kernels)}.values())
    else:
        raise CellblockError("kill: name kernels, or give --all or --profile NAME")
    denied = []
    for kernel in chosen:
        try:
            stop(kernel, args.reason)
        except PermissionError:
            denied.append(kernel)
    left = wait_gone([s for s in chosen if s not in denied], args.timeout)
    for kernel in chosen:
        state = "permission denied" if kernel in denied else \
            "still stopping" if kernel in left else "stopped"
        print(f"{kernel.kernel_id}  {kernel.record.profile:<12} {state}")
    if not chosen:
        print("no running cellblock kernel matched")
    return 1 if denied or left else 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_dir, json_schema
    from .audit_query import Filter, format_event, parse_since, query
    from .policy import load_policy

    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise CellblockError(str(exc)) from None
    directory = Path(args.dir) if args.dir else audit_dir(load_policy().audit.dir)
    flt = Filter(kernel=args.kernel or "", event=args.event or "", since=since)
    try:
        for event in query(directory, flt, follow=args.follow):
            print(event.model_dump_json() if args.json else format_event(event), flush=True)
    except BrokenPipeError:  # `cellblock audit | head`
        return 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellblock", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    inst = sub.add_parser("install", help="install one kernelspec per profile")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true", help="into sys.prefix")
    where.add_argument("--prefix", help="into this prefix")
    inst.set_defaults(func=_cmd_install)

    doc = sub.add_parser("doctor", help="check that this host can run the profiles")
    doc.add_argument("profiles", nargs="*", help="profiles to check (default: all)")
    doc.set_defaults(func=_cmd_doctor)

    prof = sub.add_parser("profiles", help="list profiles or show one resolved")
    psub = prof.add_subparsers(dest="action", required=True)
    psub.add_parser("list")
    show = psub.add_parser("show")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    prof.set_defaults(func=_cmd_profiles)

    run = sub.add_parser("run", help="execute a notebook in the sandbox with nbclient")
    run.add_argument("notebook", nargs="?", help="default: the embedded quickstart")
    run.add_argument("--profile", default="agent")
    run.add_argument("--output", help="where to write the executed notebook")
    run.add_argument("--timeout", type=float, default=120.0, help="seconds per cell")
    run.add_argument("--datasets", help="comma-separated datasets the profile allows (default: "
                     "the quickstart's 'sample'; for a notebook, $CELLBLOCK_DATASETS, else the "
                     "profile's default_datasets)")
    run.set_defaults(func=_cmd_run)

    for verb, text in (("grant", "grant a dataset the kernel's profile allows, now"),
                       ("revoke", "refuse a kernel's future opens of a dataset")):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("kernel", help="kernel id, or a unique prefix of one")
        cmd.add_argument("dataset")
        cmd.set_defaults(func=_cmd_grant)

    net = sub.add_parser("net", help="a running kernel's network (profiles that allow it)")
    netsub = net.add_subparsers(dest="action", required=True)
    lock = netsub.add_parser("lock", help="close the allowlist now: install, then lock")
    lock.add_argument("kernel", help="kernel id, or a unique prefix of one")
    lock.set_defaults(func=_cmd_net)

    ps = sub.add_parser("ps", help="list running sandboxes")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_cmd_ps)

    audit = sub.add_parser("audit", help="read (and follow) the audit logs")
    audit.add_argument("--kernel", help="kernel id or a prefix of one")
    audit.add_argument("--event", help="event name or glob, e.g. 'execution.*'")
    audit.add_argument("--since", help="30s, 10m, 2h, 1d ago, or an ISO 8601 time")
    audit.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    audit.add_argument("--json", action="store_true", help="the raw JSON lines")
    audit.add_argument("--schema", action="store_true", help="print the JSON Schema and exit")
    audit.add_argument("--dir", help="audit directory (default: $CELLBLOCK_AUDIT_DIR, else "
                       "the policy's [audit] dir, else the per-user default)")
    audit.set_defaults(func=_cmd_audit)

    kill = sub.add_parser("kill", help="stop sandboxes now (the client sees "
                          "'stopped by operator')")
    kill.add_argument("kernels", nargs="*", help="kernel ids or unique prefixes")
    kill.add_argument("--all", action="store_true", help="every running sandbox")
    kill.add_argument("--profile", help="every running sandbox of this profile")
    kill.add_argument("--reason", default="", help="one line appended to the message")
    kill.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for each warden to finish cleaning up")
    kill.set_defaults(func=_cmd_kill)

    mcp = sub.add_parser("mcp", help="serve MCP on stdin/stdout: run_python, list_datasets "
                         "and restart on one sandbox per session")
    mcp.add_argument("--profile", default="agent")
    mcp.add_argument("--datasets", default="", help="comma-separated datasets the profile "
                     "allows (default: its default_datasets)")
    mcp.set_defaults(func=_cmd_mcp)
    add_output_command(sub)
    from .files.cli import add_commands as add_file_commands  # upload, files, download

    add_file_commands(sub)
    return p


def one_line(message: str) -> str:
    """A possibly multi-line error message as one line (policy errors list one problem a
    line; the CLI prints them separated by `` | ``)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} {' | '.join(lines[1:])}"


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 success, 1 a check, notebook or jail failed, 2 bad input."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except JailStartError as exc:
        print(f"cellblock: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except CellblockError as exc:
        print(f"cellblock: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cellblock profiles show agent | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
