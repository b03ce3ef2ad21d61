"""Run a command under an OCI seccomp profile, as a container runtime would load it.

    python tests/seccomp_exec.py PROFILE.json -- COMMAND [ARG...]

Builds the filter with the host's libseccomp (through ctypes: no dependency), for the
native architecture, loads it (no_new_privs is set, as in a container) and execs
COMMAND: it and every process it starts are held to the profile. Used by
tests/test_kubernetes.py to run a real worker under deploy/seccomp/toolq-bwrap.json.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from typing import Any

ACT_ALLOW = 0x7FFF0000
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def errno_action(errno: int) -> int:
    return 0x00050000 | (errno & 0xFFFF)


def action(rule: dict[str, Any], default_errno: int) -> int:
    if rule["action"] == "SCMP_ACT_ALLOW":
        return ACT_ALLOW
    if rule["action"] == "SCMP_ACT_ERRNO":
        return errno_action(int(rule.get("errnoRet", default_errno)))
    raise ValueError(f"unsupported action {rule['action']}")


def load(profile: dict[str, Any]) -> None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    default_errno = int(profile.get("defaultErrnoRet", 1))
    ctx = lib.seccomp_init(errno_action(default_errno))
    if not ctx:
        raise OSError("seccomp_init failed")
    for rule in profile["syscalls"]:
        act = action(rule, default_errno)
        conditions = rule.get("args") or []
        array = (ArgCmp * max(len(conditions), 1))(
            *[
                ArgCmp(c["index"], OPS[c["op"]], c["value"], c.get("valueTwo", 0))
                for c in conditions
            ]
        )
        for syscall in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number < 0:
                continue  # not a syscall of this architecture
            rc = lib.seccomp_rule_add_array(ctx, act, number, len(conditions), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add {syscall}: {os.strerror(-rc)}")
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        load(json.load(f))
    os.execvp(sys.argv[3], sys.argv[3:])


if __name__ == "__main__":
    main()
