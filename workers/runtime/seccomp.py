"""Seccomp filters for sandboxed tools, as classic-BPF programs built here.

Two programs, both of `struct sock_filter` (``<HBBI``: code, jt, jf, k):

- :func:`sandbox_filter` is handed to bwrap (``--seccomp FD``), which loads it just
  before it executes Bun: every process of the sandbox runs under it. It denies with
  EPERM what a tool never needs and what widens the kernel surface it can reach:
  debugging other processes (``ptrace``, ``process_vm_*``, ``kcmp``, ``pidfd_getfd``),
  mounts and new namespaces (``mount`` family, ``unshare``, ``setns``, ``clone`` with a
  ``CLONE_NEW*`` flag), kernel programs and keys (``bpf``, ``perf_event_open``,
  ``keyctl``…), ``io_uring`` (a second syscall path seccomp cannot see), modules,
  reboot, swap, clocks, ``userfaultfd``, ``personality``. ``clone3`` gets ENOSYS, since its
  flags sit behind a pointer a filter cannot read: libc then falls back to ``clone``.
- :func:`no_exec_filter` denies ``execve``/``execveat``. bwrap would apply it before
  Bun's own exec, so the wrapper installs it itself once Bun runs (``seccomp(2)`` with
  TSYNC through ``bun:ffi``) when ``--allow-run`` is absent.

Both check ``seccomp_data.arch`` first and kill the process on any other architecture
(a 32-bit syscall table would bypass the numbers below); on x86-64 the x32 ABI
(``nr >= 0x40000000``) is denied as well.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from dataclasses import dataclass

# BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
# seccomp return values (linux/seccomp.h)
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
# offsets in struct seccomp_data
_NR, _ARCH, _ARG0 = 0, 4, 16
X32_SYSCALL_BIT = 0x40000000
CLONE_NEW_FLAGS = 0x7E020000
"""CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET."""


@dataclass(frozen=True)
class Arch:
    audit: int
    numbers: dict[str, int]
    x32: bool = False


_COMMON_GENERIC = {  # numbers shared by x86-64 and the generic table (aarch64)
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "move_mount": 429,
    "open_tree": 428,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "pidfd_getfd": 438,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "clone3": 435,
}
X86_64 = Arch(
    audit=0xC000003E,
    x32=True,
    numbers={
        **_COMMON_GENERIC,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "bpf": 321,
        "perf_event_open": 298,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "unshare": 272,
        "setns": 308,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "create_module": 174,
        "get_kernel_syms": 177,
        "query_module": 178,
        "nfsservctl": 180,
        "uselib": 134,
        "_sysctl": 156,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "userfaultfd": 323,
        "personality": 135,
        "acct": 163,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "iopl": 172,
        "ioperm": 173,
        "quotactl": 179,
        "lookup_dcookie": 212,
        "syslog": 103,
        "vhangup": 153,
        "sethostname": 170,
        "setdomainname": 171,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "kcmp": 312,
        "fanotify_init": 300,
        "clone": 56,
        "execve": 59,
        "execveat": 322,
    },
)
AARCH64 = Arch(
    audit=0xC00000B7,
    numbers={
        **_COMMON_GENERIC,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "bpf": 280,
        "perf_event_open": 241,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "unshare": 97,
        "setns": 268,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "nfsservctl": 42,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "userfaultfd": 282,
        "personality": 92,
        "acct": 89,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "quotactl": 60,
        "lookup_dcookie": 18,
        "syslog": 116,
        "vhangup": 58,
        "sethostname": 161,
        "setdomainname": 162,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "kcmp": 272,
        "fanotify_init": 262,
        "clone": 220,
        "execve": 221,
        "execveat": 281,
    },
)
ARCHES = {"x86_64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}

DENIED = [
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "personality",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "nfsservctl",
    "uselib",
    "_sysctl",
    "lookup_dcookie",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "sethostname",
    "setdomainname",
    "name_to_handle_at",
    "open_by_handle_at",
    "fanotify_init",
]
"""Syscalls a sandboxed tool gets EPERM for (those absent on an architecture are skipped)."""


def host_arch() -> Arch:
    """The filter's architecture; unknown ones are refused (ValueError), not guessed."""
    machine = platform.machine()
    try:
        return ARCHES[machine]
    except KeyError:
        raise ValueError(f"no seccomp syscall table for architecture {machine!r}") from None


class _Program:
    """Instructions with symbolic jump targets, resolved when packed."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def pack(self) -> bytes:
        out = bytearray()
        for index, (code, jt, jf, k) in enumerate(self.code):
            out += struct.pack("<HBBI", code, self._offset(index, jt), self._offset(index, jf), k)
        return bytes(out)

    def _offset(self, index: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump to {target} out of range")
        return offset


def _prologue(program: _Program, arch: Arch) -> None:
    program.op(_LD_W_ABS, _ARCH)
    program.op(_JEQ_K, arch.audit, jt=1)
    program.op(_RET_K, RET_KILL_PROCESS)
    program.op(_LD_W_ABS, _NR)
    if arch.x32:
        program.op(_JGE_K, X32_SYSCALL_BIT, jt="deny")


def sandbox_filter(arch: Arch | None = None) -> bytes:
    """The filter bwrap loads for the whole sandbox (see the module docstring)."""
    arch = arch or host_arch()
    program = _Program()
    _prologue(program, arch)
    for name in DENIED:
        if name in arch.numbers:
            program.op(_JEQ_K, arch.numbers[name], jt="deny")
    program.op(_JEQ_K, arch.numbers["clone"], jt="clone")
    program.op(_JEQ_K, arch.numbers["clone3"], jt="enosys")
    program.op(_RET_K, RET_ALLOW)
    program.label("clone")  # the flags are clone's first argument on both tables
    program.op(_LD_W_ABS, _ARG0)
    program.op(_JSET_K, CLONE_NEW_FLAGS, jt="deny")
    program.op(_RET_K, RET_ALLOW)
    program.label("enosys")
    program.op(_RET_K, RET_ERRNO | errno.ENOSYS)
    program.label("deny")
    program.op(_RET_K, RET_ERRNO | errno.EPERM)
    return program.pack()


def no_exec_filter(arch: Arch | None = None) -> bytes:
    """execve/execveat -> EPERM: installed by the wrapper after Bun has started."""
    arch = arch or host_arch()
    program = _Program()
    _prologue(program, arch)
    program.op(_JEQ_K, arch.numbers["execve"], jt="deny")
    program.op(_JEQ_K, arch.numbers["execveat"], jt="deny")
    program.op(_RET_K, RET_ALLOW)
    program.label("deny")
    program.op(_RET_K, RET_ERRNO | errno.EPERM)
    return program.pack()


def seccomp_syscall_number(arch: Arch | None = None) -> int:
    """``seccomp(2)``'s number, for the wrapper's ``syscall()`` (glibc has no wrapper)."""
    return 317 if (arch or host_arch()) is X86_64 else 277


def filter_fd(program: bytes) -> int:
    """A pipe's read end holding ``program``, for bwrap's ``--seccomp FD`` (one per launch:
    bwrap reads it to the end, so a shared file would be empty for the next one)."""
    read, write = os.pipe()
    try:
        os.write(write, program)  # a few hundred bytes: fits the pipe buffer
    finally:
        os.close(write)
    return read
