"""The kafel seccomp policy, probed from inside a real nsjail.

Every refusal in ``nsjail-configs/seccomp-kernel.kafel`` is tried with ctypes
``syscall()`` in a jailed Python, and the exact outcome is asserted: EPERM, ENOSYS
for clone3, EOPNOTSUPP for route netlink, SIGSYS for other ABIs. Three jails answer
the whole table (each probe runs in its own forked child, so one probe cannot disturb
the next):

- ``kernel``: the jail exactly as the launcher starts it (uid 1000, no capabilities);
- ``capable``: the same jail, but root of its user namespace with all capabilities
  kept, standing for a namespace bug that hands capabilities back. The policy must
  refuse regardless;
- ``control``: the capable jail with no seccomp policy at all. A probe proves the
  policy only if its control outcome differs, so each probe's arguments are chosen
  for that (a bad fd, a missing path, an invalid flag) and a test checks it. The few
  probes whose calls need a capability of the host's initial user namespace cannot
  differ; they say so.

THREATS.md cases: K1-K16, K18, N6, N7, N11, N13, N14, F8, F14, F22, F23.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jailprobe import POLICY, REPO, JailResult, run_in_jail

# Every test here but the static one starts real jails; all must pass unprivileged too.
jail = pytest.mark.jail
nonroot = pytest.mark.nonroot

SIGSYS = int(signal.SIGSYS)

# Runs inside the jail: helpers for the probe expressions, and a loop that evaluates
# each expression in a forked child and prints every outcome as one JSON object.
PROBE_RUNNER = r'''
import ctypes, json, mmap, os, signal, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _arg(a):
    if isinstance(a, int):
        return ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    return a


def sc(nr, *args):
    """Raw syscall; {"ret": value, "errno": errno or 0}."""
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    return {"ret": ret, "errno": ctypes.get_errno() if ret == -1 else 0}


_KEEP = []  # buffers passed by address must outlive the expression that made them


def buf(n):
    b = ctypes.create_string_buffer(n)
    _KEEP.append(b)
    return b


def addr(obj):
    return ctypes.addressof(obj)


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def iov(b):
    return IOVec(ctypes.addressof(b), len(b))


def vm_rw(nr):
    """process_vm_readv/writev between two buffers of this process."""
    local, remote = buf(8), buf(8)
    lv, rv = iov(local), iov(remote)
    return sc(nr, os.getpid(), addr(lv), 1, addr(rv), 1, 0)


def py(fn):
    """Run a Python-level call; {"errno": its OSError errno, or 0}."""
    try:
        fn()
    except OSError as exc:
        return {"errno": exc.errno}
    return {"errno": 0}


def child_exits(result):
    """For clone() used like fork(): the child must not report twice."""
    if result["ret"] == 0:
        os._exit(0)
    return result


def attach_to_child():
    """PTRACE_ATTACH to a sleeping child of ours (allowed by the kernel)."""
    pid = os.fork()
    if pid == 0:
        os.closerange(3, 1 << 16)
        signal.pause()
        os._exit(0)
    try:
        return sc(101, 16, pid, 0, 0)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def machine_code(code):
    """A callable for raw x86 bytes in an executable anonymous mapping."""
    m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    fn.keep = m
    return fn


def run_probes(probes):
    results = {}
    for name, expr in probes.items():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = eval(expr)
            except Exception as exc:
                out = {"exception": repr(exc)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results[name] = {"signal": os.WTERMSIG(status)}
        elif data:
            results[name] = json.loads(data)
        else:
            results[name] = {"exit": os.WEXITSTATUS(status)}
    print("PROBES " + json.dumps(results))

'''

# Why a probe's control run cannot differ: the call needs a capability of the host's
# initial user namespace (or a sysctl forbids it), so the kernel refuses it as well.
INIT_NS_ONLY = "needs a capability of the initial user namespace; the kernel refuses too"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One call tried in the jail.

    ``expect`` is an errno, or ``-SIGSYS`` for "killed by seccomp". ``weak`` says why
    the control run cannot tell the policy from the kernel (empty: it must differ).
    ``control`` is False for probes that would hang or harm the control jail.
    """

    name: str
    expr: str
    expect: int
    weak: str = ""
    control: bool = True


def outcome(result: dict) -> int | str:
    """An errno (0 for success), ``-signal`` for a killed probe, else a description."""
    if "signal" in result:
        return -result["signal"]
    if "errno" in result:
        return result["errno"]
    return f"unexpected: {result}"


def describe(value: int | str) -> str:
    if isinstance(value, str):
        return value
    if value == 0:
        return "success"
    if value < 0:
        return f"killed by {signal.Signals(-value).name}"
    return errno.errorcode.get(value, str(value))


EPERM, ENOSYS, EOPNOTSUPP = errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP
I386_GETPID = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"
I386_MOUNT = b"\xb8\x15\x00\x00\x00\xcd\x80\xc3"
KILLED = -SIGSYS

# x86_64 numbers: arch/x86/entry/syscalls/syscall_64.tbl.
REFUSALS = [
    # K1, K2, K14: other processes.
    Probe("ptrace(PTRACE_ATTACH, 1)", "sc(101, 16, 1, 0, 0)", EPERM, control=False),
    Probe("ptrace(PTRACE_ATTACH, child)", "attach_to_child()", EPERM),
    Probe("process_vm_readv(self)", "vm_rw(310)", EPERM),
    Probe("process_vm_writev(self)", "vm_rw(311)", EPERM),
    Probe("kcmp(self, self, KCMP_VM)", "sc(312, os.getpid(), os.getpid(), 1, 0, 0)", EPERM),
    Probe("pidfd_getfd(self, 0)", "sc(438, os.pidfd_open(os.getpid()), 0, 0)", EPERM),
    Probe("process_madvise(self)", "sc(440, os.pidfd_open(os.getpid()), 0, 0, 20, 0)", EPERM),
    Probe("process_mrelease(self)", "sc(448, os.pidfd_open(os.getpid()), 0)", EPERM),
    # K4-K6: nested namespaces.
    Probe("unshare(CLONE_NEWUSER)", "sc(272, 0x10000000)", EPERM),
    Probe("unshare(CLONE_NEWNS)", "sc(272, 0x20000)", EPERM),
    Probe("unshare(CLONE_NEWNET)", "sc(272, 0x40000000)", EPERM),
    Probe("unshare(CLONE_NEWTIME)", "sc(272, 0x80)", EPERM),
    Probe("setns(/proc/1/ns/mnt)", "sc(308, os.open('/proc/1/ns/mnt', os.O_RDONLY), 0)", EPERM),
    Probe("setns(bad fd)", "sc(308, 9999, 0)", EPERM),
    Probe("clone(CLONE_NEWNS|SIGCHLD)", "child_exits(sc(56, 0x20000 | 17, 0, 0, 0, 0))", EPERM),
    Probe("clone(CLONE_NEWUSER|SIGCHLD)", "child_exits(sc(56, 0x10000000 | 17, 0, 0, 0, 0))",
          EPERM),
    # With CLONE_THREAD but no CLONE_SIGHAND the kernel answers EINVAL before it
    # looks at namespaces, so each flag on its own shows that the mask covers it.
    *(
        Probe(f"clone({flag}|CLONE_THREAD)", f"child_exits(sc(56, {bit:#x} | 0x10000, 0, 0, 0, 0))",
              EPERM)
        for flag, bit in [
            ("CLONE_NEWNS", 0x00020000),
            ("CLONE_NEWCGROUP", 0x02000000),
            ("CLONE_NEWUTS", 0x04000000),
            ("CLONE_NEWIPC", 0x08000000),
            ("CLONE_NEWUSER", 0x10000000),
            ("CLONE_NEWPID", 0x20000000),
            ("CLONE_NEWNET", 0x40000000),
        ]
    ),
    Probe("clone3(NULL, 0)", "sc(435, 0, 0)", ENOSYS),
    Probe("listns", "sc(470, 0, 0, 0, 0)", EPERM),
    # K3, F8, F14: mounts.
    Probe("mount(tmpfs on /tmp)", "sc(165, b'none', b'/tmp', b'tmpfs', 0, 0)", EPERM),
    Probe("mount(cgroup rdma) (F8)",
          "(os.makedirs('/tmp/c', exist_ok=True), sc(165, b'cgroup', b'/tmp/c', b'cgroup', 0, "
          "b'rdma'))[1]", EPERM),
    Probe("mount(MS_REMOUNT|MS_BIND, /usr) (F14)", "sc(165, 0, b'/usr', 0, 0x20 | 0x1000, 0)",
          EPERM),
    Probe("umount2(/proc, MNT_DETACH)", "sc(166, b'/proc', 2)", EPERM),
    Probe("umount2(/nonexistent)", "sc(166, b'/nonexistent', 0)", EPERM),
    Probe("pivot_root(/nonexistent)", "sc(155, b'/nonexistent', b'/nonexistent')", EPERM),
    Probe("chroot(/tmp)", "sc(161, b'/tmp')", EPERM),
    Probe("chroot(/nonexistent)", "sc(161, b'/nonexistent')", EPERM),
    Probe("move_mount(bad fd)", "sc(429, 9999, b'', 9999, b'', 0)", EPERM),
    Probe("open_tree(/tmp, OPEN_TREE_CLONE)", "sc(428, -100, b'/tmp', 1)", EPERM),
    Probe("open_tree_attr(/tmp)", "sc(467, -100, b'/tmp', 1, 0, 0)", EPERM),
    Probe("fsopen(tmpfs)", "sc(430, b'tmpfs', 0)", EPERM),
    Probe("fsconfig(bad fd)", "sc(431, 9999, 0, 0, 0, 0)", EPERM),
    Probe("fsmount(bad fd)", "sc(432, 9999, 0, 0)", EPERM),
    Probe("fspick(/tmp)", "sc(433, -100, b'/tmp', 0)", EPERM),
    Probe("mount_setattr(/tmp)", "sc(442, -100, b'/tmp', 0, 0, 0)", EPERM),
    Probe("statmount(NULL)", "sc(457, 0, 0, 0, 0)", EPERM),
    Probe("listmount(NULL)", "sc(458, 0, 0, 0, 0)", EPERM),
    # K7-K11: kernel subsystems.
    Probe("bpf(BPF_PROG_LOAD, NULL)", "sc(321, 5, 0, 0)", EPERM,
          weak="kernel.unprivileged_bpf_disabled refuses it too"),
    Probe("bpf(unknown command)", "sc(321, 0xffff, addr(buf(64)), 64)", EPERM),
    Probe("perf_event_open(NULL)", "sc(298, 0, 0, -1, -1, 0)", EPERM),
    Probe("userfaultfd(0)", "sc(323, 0)", EPERM,
          weak="vm.unprivileged_userfaultfd=0 refuses it too"),
    Probe("userfaultfd(UFFD_USER_MODE_ONLY)", "sc(323, 1)", EPERM),
    Probe("io_uring_setup(8, params)", "sc(425, 8, addr(buf(120)))", EPERM),
    Probe("io_uring_enter(bad fd)", "sc(426, 9999, 0, 0, 0, 0, 0)", EPERM),
    Probe("io_uring_register(bad fd)", "sc(427, 9999, 0, 0, 0)", EPERM),
    # An unknown key type: the control run must not add a key to a real keyring.
    Probe("add_key(unknown type, session keyring)",
          "sc(248, b'cellblock-none', b'k', b'v', 1, -3)", EPERM),
    Probe("keyctl(KEYCTL_GET_KEYRING_ID, session)", "sc(250, 0, -3, 0)", EPERM),
    Probe("request_key(unknown type)", "sc(249, b'cellblock-none', b'k', 0, 0)", EPERM),
    Probe("fanotify_init(FAN_REPORT_FID)", "sc(300, 0x200, 0)", EPERM),
    Probe("fanotify_mark(bad fd)", "sc(301, 9999, 0, 0, -100, b'/tmp')", EPERM),
    # K12: host-wide state.
    Probe("init_module(NULL)", "sc(175, 0, 0, b'')", EPERM),
    Probe("finit_module(bad fd)", "sc(313, 9999, b'', 0)", EPERM),
    Probe("delete_module(nosuch)", "sc(176, b'nosuch', 0)", EPERM),
    Probe("kexec_load(NULL)", "sc(246, 0, 0, 0, 0)", EPERM),
    Probe("kexec_file_load(bad fd)", "sc(320, 9999, 9999, 0, b'', 0)", EPERM),
    Probe("reboot(bad magic)", "sc(169, 0, 0, 0, 0)", EPERM),
    Probe("swapon(/nonexistent)", "sc(167, b'/nonexistent', 0)", EPERM, weak=INIT_NS_ONLY),
    Probe("swapoff(/nonexistent)", "sc(168, b'/nonexistent')", EPERM, weak=INIT_NS_ONLY),
    Probe("acct(NULL)", "sc(163, 0)", EPERM, weak=INIT_NS_ONLY),
    Probe("settimeofday(NULL, NULL)", "sc(164, 0, 0)", EPERM, weak=INIT_NS_ONLY),
    Probe("clock_settime(CLOCK_REALTIME, NULL)", "sc(227, 0, 0)", EPERM),
    Probe("clock_adjtime(CLOCK_REALTIME)", "sc(305, 0, addr(buf(256)))", EPERM),
    Probe("adjtimex()", "sc(159, addr(buf(256)))", EPERM),
    Probe("syslog(SYSLOG_ACTION_SIZE_BUFFER)", "sc(103, 10, 0, 0)", EPERM,
          weak="kernel.dmesg_restrict=1 refuses it too"),
    Probe("quotactl(Q_SYNC)", "sc(179, 0x800001, 0, 0, 0)", EPERM),
    Probe("quotactl_fd(bad fd)", "sc(443, 9999, 0x800001, 0, 0)", EPERM),
    Probe("sethostname", "sc(170, b'x', 1)", EPERM),
    Probe("setdomainname", "sc(171, b'x', 1)", EPERM),
    Probe("vhangup", "sc(153)", EPERM, weak=INIT_NS_ONLY),
    Probe("iopl(0)", "sc(172, 0)", EPERM),
    Probe("ioperm(off)", "sc(173, 0x80, 1, 0)", EPERM),
    # K14: file handles; legacy and cross-process interfaces.
    Probe("open_by_handle_at(NULL)", "sc(304, -100, 0, 0)", EPERM),
    Probe("name_to_handle_at(/)", "sc(303, -100, b'/', addr(buf(128)), addr(buf(8)), 0)", EPERM),
    Probe("lookup_dcookie", "sc(212, 0, 0, 0)", EPERM),
    Probe("modify_ldt(read)", "sc(154, 0, addr(buf(64)), 64)", EPERM),
    Probe("uselib(/nonexistent)", "sc(134, b'/nonexistent')", EPERM),
    Probe("migrate_pages(self)", "sc(256, 0, 0, 0, 0)", EPERM),
    Probe("move_pages(self, no pages)", "sc(279, 0, 0, 0, 0, 0, 0)", EPERM),
    Probe("lsm_set_self_attr", "sc(460, 100, 0, 0, 0)", EPERM),
    # K13: execution domains.
    Probe("personality(READ_IMPLIES_EXEC)", "sc(135, 0x0400000)", EPERM),
    Probe("personality(ADDR_NO_RANDOMIZE)", "sc(135, 0x0040000)", EPERM),
    Probe("personality(PER_LINUX | 1<<32)", "sc(135, 1 << 32)", EPERM),
    # F22: device nodes (the char 0:0 whiteout is allowed to a capable userns root).
    Probe("mknod(/tmp/n, S_IFCHR, 1:3)", "sc(133, b'/tmp/n', 0o20666, os.makedev(1, 3))", EPERM,
          weak=INIT_NS_ONLY),
    Probe("mknod(/tmp/w, S_IFCHR, 0:0)", "sc(133, b'/tmp/w', 0o20000, 0)", EPERM),
    Probe("mknod(/nonexistent/n, S_IFCHR)",
          "sc(133, b'/nonexistent/n', 0o20666, os.makedev(1, 3))", EPERM),
    Probe("mknodat(/nonexistent/n, S_IFBLK)",
          "sc(259, -100, b'/nonexistent/n', 0o60666, os.makedev(7, 0))", EPERM),
    Probe("os.mknod(S_IFCHR) (F22)", "py(lambda: os.mknod('/tmp/m', 0o20666, os.makedev(1, 1)))",
          EPERM, weak=INIT_NS_ONLY),
    # F23: terminal injection, with the command's high 32 bits set too.
    Probe("ioctl(0, TIOCSTI)", "sc(16, 0, 0x5412, b'x')", EPERM),
    Probe("ioctl(0, TIOCSTI | 1<<32)", "sc(16, 0, 0x5412 | (1 << 32), b'x')", EPERM),
    Probe("ioctl(0, TIOCLINUX)", "sc(16, 0, 0x541c, addr(buf(8)))", EPERM),
    Probe("ioctl(0, TIOCSETD)", "sc(16, 0, 0x5423, addr(buf(8)))", EPERM),
    # N6, N7, N11, N13, N14: socket families and raw sockets.
    Probe("socket(AF_PACKET, SOCK_RAW) (N7)", "sc(41, 17, 3, 0)", EPERM),
    Probe("socket(AF_PACKET, SOCK_DGRAM)", "sc(41, 17, 2, 0)", EPERM),
    Probe("socket(AF_NETLINK, NETLINK_NETFILTER) (N11)", "sc(41, 16, 3, 12)", EPERM),
    Probe("socket(AF_NETLINK, NETLINK_ROUTE)", "sc(41, 16, 3, 0)", EOPNOTSUPP),
    Probe("socket(AF_NETLINK, NETLINK_ROUTE | 1<<32)", "sc(41, 16, 3, 1 << 32)", EPERM),
    Probe("socket(AF_VSOCK) (N13)", "sc(41, 40, 1, 0)", EPERM),
    Probe("socket(AF_ALG) (N14)", "sc(41, 38, 5, 0)", EPERM),
    Probe("socket(AF_BLUETOOTH)", "sc(41, 31, 3, 0)", EPERM),
    Probe("socket(AF_CAN)", "sc(41, 29, 3, 1)", EPERM),
    Probe("socket(AF_XDP)", "sc(41, 44, 3, 0)", EPERM),
    Probe("socket(AF_RDS)", "sc(41, 21, 5, 0)", EPERM),
    Probe("socket(AF_TIPC)", "sc(41, 30, 5, 0)", EPERM),
    Probe("socket(AF_KEY)", "sc(41, 15, 3, 2)", EPERM),
    Probe("socket(AF_INET | 1<<32, SOCK_STREAM)", "sc(41, 2 | (1 << 32), 1, 0)", EPERM),
    Probe("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) (N6)", "sc(41, 2, 3, 1)", EPERM),
    Probe("socket(AF_INET, SOCK_RAW|SOCK_CLOEXEC)", "sc(41, 2, 3 | 0o2000000, 255)", EPERM),
    Probe("socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)", "sc(41, 10, 3, 58)", EPERM),
    Probe("socket(AF_INET, SOCK_PACKET)", "sc(41, 2, 10, 0x300)", EPERM),
    Probe("socket.socket(AF_PACKET, SOCK_RAW)", "py(lambda: __import__('socket').socket(17, 3))",
          EPERM),
    Probe("socketpair(AF_INET)", "sc(53, 2, 1, 0, addr(buf(8)))", EPERM),
    Probe("socketpair(AF_NETLINK)", "sc(53, 16, 3, 0, addr(buf(8)))", EPERM),
    # K15: other ABIs, and numbers unknown to x86_64.
    # mov eax, nr; int 0x80; ret -- i386 getpid is 20, i386 mount is 21.
    Probe("i386 int 0x80 getpid", f"{{'ret': machine_code({I386_GETPID!r})()}}", KILLED),
    Probe("i386 int 0x80 mount", f"{{'ret': machine_code({I386_MOUNT!r})()}}", KILLED),
    Probe("x32 getpid (39 | 0x40000000)", "sc(0x40000000 | 39)", KILLED),
    Probe("x32 ptrace (521 | 0x40000000)", "sc(0x40000000 | 521, 16, 1, 0, 0)", KILLED),
    Probe("x32 mount (165 | 0x40000000)", "sc(0x40000000 | 165, b'none', b'/tmp', b'tmpfs', 0, 0)",
          KILLED),
    Probe("unknown syscall 1000", "sc(1000)", KILLED),
    Probe("reserved future syscall 471", "sc(471)", ENOSYS, weak="the kernel has no syscall 471"),
]

# Calls the policy names with arguments it lets through: the filtered outcome must
# equal the unfiltered one, whatever the kernel answers.
ALLOWED = [
    Probe("personality(PER_LINUX)", "sc(135, 0)", 0),
    Probe("personality(query)", "sc(135, 0xffffffff)", 0),
    Probe("mknod(/tmp/fifo, S_IFIFO)", "sc(133, b'/tmp/fifo', 0o10600, 0)", 0),
    Probe("mknodat(/tmp/reg, S_IFREG)", "sc(259, -100, b'/tmp/reg', 0o100600, 0)", 0),
    Probe("ioctl(0, TIOCGWINSZ)", "sc(16, 0, 0x5413, addr(buf(8)))", 0),
    Probe("ioctl(0, TIOCSTI + 1<<16)", "sc(16, 0, 0x5412 + (1 << 16), b'x')", 0),
    Probe("socketpair(AF_UNIX)", "sc(53, 1, 1, 0, addr(buf(8)))", 0),
    Probe("socket(AF_UNIX, SOCK_DGRAM)", "sc(41, 1, 2, 0)", 0),
    Probe("socket(AF_INET, SOCK_STREAM)", "sc(41, 2, 1, 0)", 0),
    Probe("socket(AF_INET6, SOCK_DGRAM)", "sc(41, 10, 2, 0)", 0),
    Probe("socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP) (ping)", "sc(41, 2, 2, 1)", 0),
    Probe("clone(CLONE_THREAD) without CLONE_SIGHAND",
          "child_exits(sc(56, 0x10000, 0, 0, 0, 0))", 0),
    Probe("clone(SIGCHLD)", "child_exits(sc(56, 17, 0, 0, 0, 0))", 0),
    Probe("getpid", "sc(39)", 0),
]


def _probe_code(probes: list[Probe]) -> str:
    """The runner with the probes' expressions built in, as a JSON literal."""
    table = json.dumps({p.name: p.expr for p in probes})
    return PROBE_RUNNER + f"\nrun_probes(json.loads({table!r}))\n"


def _parse_probe_output(stdout: str) -> dict[str, dict] | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PROBES ")]
    return json.loads(lines[-1][len("PROBES "):]) if lines else None


def _run_table(probes: list[Probe], **jail_options: object) -> dict[str, dict]:
    result = run_in_jail(_probe_code(probes), **jail_options)  # type: ignore[arg-type]
    table = _parse_probe_output(result.stdout)
    assert result.returncode == 0 and table, f"the probe runner failed\n{result.describe()}"
    return table


@pytest.fixture(scope="module")
def kernel_jail() -> dict[str, dict]:
    """Outcomes in the jail exactly as the launcher starts a kernel."""
    return _run_table(REFUSALS + ALLOWED)


@pytest.fixture(scope="module")
def capable_jail() -> dict[str, dict]:
    """Outcomes in the same jail run as root of its user namespace, capabilities kept."""
    return _run_table(REFUSALS + ALLOWED, capable=True)


@pytest.fixture(scope="module")
def control_jail() -> dict[str, dict]:
    """Outcomes in the capable jail with no seccomp policy."""
    return _run_table([p for p in REFUSALS + ALLOWED if p.control], capable=True, policy=None)


def _check(probes: list[Probe], results: dict[str, dict], where: str) -> None:
    wrong = []
    for probe in probes:
        got = outcome(results[probe.name])
        if got != probe.expect:
            wrong.append(f"{probe.name}: expected {describe(probe.expect)}, got {describe(got)} "
                         f"({results[probe.name]})")
    assert not wrong, (
        f"{len(wrong)} refusal(s) did not hold in the {where} jail:\n" + "\n".join(wrong)
    )


@jail
@nonroot
@pytest.mark.parametrize("probe", REFUSALS, ids=lambda p: p.name)
def test_refused_in_kernel_jail(probe: Probe, kernel_jail: dict[str, dict]) -> None:
    _check([probe], kernel_jail, "kernel")


@jail
@nonroot
@pytest.mark.parametrize("probe", REFUSALS, ids=lambda p: p.name)
def test_refused_even_with_namespace_capabilities(
    probe: Probe, capable_jail: dict[str, dict]
) -> None:
    _check([probe], capable_jail, "capable")


@jail
@nonroot
@pytest.mark.parametrize(
    "probe", [p for p in REFUSALS if p.control and not p.weak], ids=lambda p: p.name
)
def test_probe_would_succeed_without_the_policy(
    probe: Probe, control_jail: dict[str, dict]
) -> None:
    """Without the policy the call gets past the point where the policy stops it.

    Probes marked ``weak`` are left out: the kernel refuses them on its own, and the
    two tests above still pin the policy's answer for them.
    """
    got = outcome(control_jail[probe.name])
    assert got != probe.expect, (
        f"{probe.name}: the unfiltered jail also answers {describe(got)}, so this probe "
        f"cannot tell the policy from the kernel ({control_jail[probe.name]})"
    )


@jail
@nonroot
@pytest.mark.parametrize("probe", ALLOWED, ids=lambda p: p.name)
def test_allowed_arguments_pass_through(
    probe: Probe, kernel_jail: dict[str, dict], capable_jail: dict[str, dict],
    control_jail: dict[str, dict],
) -> None:
    """The policy is transparent for these: same outcome with and without it."""
    for where, results in (("kernel", kernel_jail), ("capable", capable_jail)):
        got = outcome(results[probe.name])
        assert got not in (EPERM, KILLED), f"{probe.name}: {describe(got)} in the {where} jail"
    if probe.control:
        filtered = outcome(capable_jail[probe.name])
        unfiltered = outcome(control_jail[probe.name])
        assert filtered == unfiltered, (
            f"{probe.name}: {describe(filtered)} with the policy, {describe(unfiltered)} without"
        )


def _jailed(code: str, **options: object) -> JailResult:
    result = run_in_jail(code, **options)  # type: ignore[arg-type]
    assert result.returncode == 0, result.describe()
    return result


@jail
@nonroot
def test_every_thread_is_filtered() -> None:
    """K16: Seccomp 2, NoNewPrivs 1 and no effective capability in all 51 threads."""
    code = r'''
import glob, json, threading
ready, release = threading.Barrier(51), threading.Event()
def hold():
    ready.wait()
    release.wait()
threads = [threading.Thread(target=hold) for _ in range(50)]
for t in threads:
    t.start()
ready.wait()
report = {}
for path in glob.glob("/proc/self/task/*/status"):
    fields = dict(line.split(":\t", 1) for line in open(path).read().splitlines() if ":\t" in line)
    report[path] = {k: fields[k].strip() for k in ("Seccomp", "NoNewPrivs", "CapEff")}
release.set()
for t in threads:
    t.join()
print(json.dumps(report))
'''
    report = json.loads(_jailed(code).stdout.splitlines()[-1])
    assert len(report) == 51, f"expected 51 threads, saw {len(report)}"
    wrong = {
        task: fields for task, fields in report.items()
        if fields != {"Seccomp": "2", "NoNewPrivs": "1", "CapEff": "0000000000000000"}
    }
    assert not wrong, f"threads without the full confinement: {wrong}"


@jail
@nonroot
def test_permissive_filter_on_top_changes_nothing() -> None:
    """K18: an ALLOW-everything filter installs, and the refusals stay refusals."""
    code = r'''
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
allow = (Insn * 1)(Insn(0x06, 0, 0, 0x7FFF0000))  # BPF_RET | BPF_K, SECCOMP_RET_ALLOW
prog = Prog(1, allow)
installed = libc.prctl(22, 2, ctypes.byref(prog), 0, 0)  # PR_SET_SECCOMP, MODE_FILTER
installed_errno = ctypes.get_errno()
out = {"installed": installed, "installed_errno": installed_errno}
def try_(name, nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
    out[name] = ctypes.get_errno() if ret == -1 else 0
try_("unshare(CLONE_NEWUSER)", 272, 0x10000000)
try_("ptrace(PTRACE_TRACEME)", 101, 0, 0, 0, 0)
try_("io_uring_setup", 425, 8, 0)
try_("socket(AF_PACKET)", 41, 17, 3, 0)
out["filters"] = [l for l in open("/proc/self/status") if l.startswith("Seccomp_filters")]
print(json.dumps(out))
'''
    out = json.loads(_jailed(code).stdout.splitlines()[-1])
    assert out["installed"] == 0, f"the permissive filter did not install: {out}"
    assert out["filters"] == ["Seccomp_filters:\t2\n"], f"expected two stacked filters: {out}"
    for name in ("unshare(CLONE_NEWUSER)", "ptrace(PTRACE_TRACEME)", "io_uring_setup",
                 "socket(AF_PACKET)"):
        assert out[name] == EPERM, f"{name}: {describe(out[name])} after a permissive filter"


@jail
@nonroot
def test_ordinary_kernel_work_runs_under_the_policy() -> None:
    """What a data-analysis kernel does every day still works inside the jail."""
    code = r'''
import errno, json, multiprocessing, os, socket, subprocess, threading
out = {}
import ipykernel.kernelapp, zmq
out["ipykernel"] = ipykernel.kernelapp.__name__
ls = subprocess.run(["ls", "/"], capture_output=True, text=True)
out["ls"] = [ls.returncode, sorted(ls.stdout.split())]
results = []
ts = [threading.Thread(target=lambda i=i: results.append(i * i)) for i in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
out["threads"] = sorted(results)
with multiprocessing.get_context("fork").Pool(2) as pool:
    out["pool_fork"] = pool.map(abs, [-1, -2, -3])
with multiprocessing.get_context("spawn").Pool(2) as pool:
    out["pool_spawn"] = pool.map(abs, [-4, -5])
a, b = socket.socketpair()
a.sendall(b"ping")
out["socketpair"] = b.recv(4).decode()
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
u.bind("/tmp/k.sock")
u.listen()
out["af_unix"] = os.path.exists("/tmp/k.sock")
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    t.connect(("1.1.1.1", 443))
    out["connect"] = "connected"
except OSError as exc:
    out["connect"] = errno.errorcode.get(exc.errno, exc.errno)
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"lo")
out["loopback"] = conn.recv(2).decode()
ctx = zmq.Context()
rep = ctx.socket(zmq.REP)
port = rep.bind_to_random_port("tcp://127.0.0.1")
req = ctx.socket(zmq.REQ)
req.connect(f"tcp://127.0.0.1:{port}")
req.send(b"hi")
out["zmq_tcp"] = rep.recv().decode()
ipc = ctx.socket(zmq.PAIR)
ipc.bind("ipc:///tmp/k.ipc")
out["zmq_ipc"] = True
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out["getaddrinfo"] = socket.getaddrinfo("127.0.0.1", 80, flags=socket.AI_ADDRCONFIG)[0][4][0]
print(json.dumps(out))
'''
    out = json.loads(_jailed(code).stdout.splitlines()[-1])
    assert out["ipykernel"] == "ipykernel.kernelapp"
    assert out["ls"][0] == 0 and "usr" in out["ls"][1], out["ls"]
    assert out["threads"] == [i * i for i in range(8)]
    assert out["pool_fork"] == [1, 2, 3]
    assert out["pool_spawn"] == [4, 5]
    assert out["socketpair"] == "ping"
    assert out["af_unix"] is True
    # The network namespace refuses the route; seccomp must not refuse the call.
    assert out["connect"] == "ENETUNREACH", out["connect"]
    assert out["loopback"] == "lo"
    assert out["zmq_tcp"] == "hi"
    assert out["zmq_ipc"] is True
    assert out["fork"] == 7
    assert out["getaddrinfo"] == "127.0.0.1"


@jail
@nonroot
def test_numpy_under_the_policy() -> None:
    """numpy (BLAS threads, large mappings) runs under the policy, when installed."""
    code = r'''
import json
try:
    import numpy
except ImportError:
    print(json.dumps(None))
    raise SystemExit(0)
a = numpy.random.default_rng(0).random((300, 300))
print(json.dumps(float(numpy.linalg.inv(a).dot(a).trace())))
'''
    value = json.loads(_jailed(code).stdout.splitlines()[-1])
    if value is None:
        pytest.skip("numpy is not installed in the kernel environment")
    assert abs(value - 300.0) < 1e-6


# Linux 6.2-6.19 system calls, newer than the build host's <asm/unistd_64.h>.
NEWER_SYSCALLS = [
    "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake", "futex_wait",
    "futex_requeue", "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr",
    "lsm_list_modules", "mseal", "setxattrat", "getxattrat", "listxattrat",
    "removexattrat", "open_tree_attr", "file_getattr", "file_setattr", "listns",
    "uretprobe", "uprobe",
]
# Kernel names that kafel spells differently (its table follows the sys_* names).
KAFEL_NAMES = {
    "stat": "newstat", "fstat": "newfstat", "lstat": "newlstat", "uname": "newuname",
    "sendfile": "sendfile64", "_sysctl": "sysctl", "umount2": "umount",
}


def test_policy_names_every_x86_64_syscall() -> None:
    """The default action (kill) must only ever see x32 and unknown numbers."""
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip(f"{header} is missing (install linux-libc-dev)")
    names = re.findall(r"#define __NR_(\w+) \d+", header.read_text()) + NEWER_SYSCALLS
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", POLICY.read_text(), flags=re.S)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", text))
    missing = sorted(n for n in names if KAFEL_NAMES.get(n, n) not in words)
    assert not missing, f"system calls the policy does not classify: {missing}"


@jail
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root to switch to an unprivileged user")
def test_unprivileged_user_gets_the_same_refusals() -> None:
    """Run by a user without privileges, the jail maps that user's own ids and the
    policy refuses the same calls (user ``cbprobe``; skipped if it does not exist)."""
    try:
        import pwd

        user = pwd.getpwnam("cbprobe")
    except KeyError:
        pytest.skip("no user cbprobe (useradd -m cbprobe)")
    probes = [p for p in REFUSALS if p.name in {
        "unshare(CLONE_NEWUSER)", "socket(AF_PACKET, SOCK_RAW) (N7)", "ioctl(0, TIOCSTI | 1<<32)",
        "clone3(NULL, 0)", "x32 getpid (39 | 0x40000000)", "i386 int 0x80 getpid",
    }]
    with tempfile.TemporaryDirectory(prefix="cellblock-seccomp-") as tmp:
        os.chmod(tmp, 0o755)
        for rel in ("tests/jailprobe.py", "nsjail-configs/python-kernel-no-net.cfg",
                    "nsjail-configs/seccomp-kernel.kafel"):
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, Path(tmp) / rel)
        script = (
            "import json, sys; sys.path.insert(0, 'tests'); import jailprobe\n"
            f"r = jailprobe.run_in_jail({_probe_code(probes)!r})\n"
            "print(r.stdout); print(r.stderr, file=sys.stderr); sys.exit(r.returncode)\n"
        )
        runuser = shutil.which("runuser") or "runuser"
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "CELLBLOCK_NSJAIL": _nsjail_for(tmp)}
        proc = subprocess.run(
            [runuser, "-u", user.pw_name, "--", sys.executable, "-c", script],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        table = _parse_probe_output(proc.stdout)
        assert proc.returncode == 0 and table, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        _check(probes, table, f"unprivileged ({user.pw_name})")


def _nsjail_for(tmp: str) -> str:
    """The nsjail binary, copied where any user can run it if it is not already so."""
    from jailprobe import locate_nsjail

    binary = Path(locate_nsjail())
    if all(os.access(p, os.X_OK) for p in binary.parents) and binary.stat().st_mode & 0o001:
        return str(binary)
    copy = Path(tmp) / "nsjail"
    shutil.copy(binary, copy)
    copy.chmod(0o755)
    return str(copy)
