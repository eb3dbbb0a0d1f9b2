"""The seccomp filter installed right before the program execs: the system-call tables of the
supported ABIs (x86_64, aarch64) and a classic-BPF program over ``struct seccomp_data``
(linux/seccomp.h), built here and handed to the supervisor hex-encoded. What it refuses, and why,
is in "Layers of containment" in the package docstring."""

from __future__ import annotations

import errno
import functools
import os
import struct
from dataclasses import dataclass

# Refused with EPERM (see "Layers of containment" in the package docstring).
_DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd", "ptrace",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at",
    # System V IPC and POSIX message queues: objects that outlive the process that made them, in
    # the sandbox's IPC namespace, which the responses a sandbox serves one after another share.
    "shmget", "shmat", "shmctl", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
)
# clone() flags that create namespaces: NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
# and NEWTIME.
_CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                    | 0x40000000 | 0x00000080)


@dataclass(frozen=True)
class _SyscallABI:
    audit_arch: int  # seccomp_data.arch of this ABI (AUDIT_ARCH_*)
    x32_bit: int | None  # syscall numbers with this bit belong to the x32 ABI (x86_64 only)
    nr: dict[str, int]  # syscall numbers


_SYSCALL_ABIS = {
    "x86_64": _SyscallABI(0xC000003E, 0x40000000, {
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "ptrace": 101, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "clone": 56, "clone3": 435,
        "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65, "semtimedop": 220, "semctl": 66,
        "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240, "mq_unlink": 241,
        "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245}),
    "aarch64": _SyscallABI(0xC00000B7, None, {
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "keyctl": 219, "add_key": 217, "request_key": 218,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "ptrace": 117, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "clone": 220, "clone3": 435,
        "shmget": 194, "shmat": 196, "shmctl": 195, "semget": 190, "semop": 193, "semtimedop": 192, "semctl": 191,
        "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187, "mq_open": 180, "mq_unlink": 181,
        "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185}),
}

# Classic BPF opcodes (linux/filter.h) and seccomp return values.
_BPF_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the 32-bit word at offset k of seccomp_data
_BPF_JEQ, _BPF_JGE, _BPF_JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_{JEQ,JGE,JSET} | BPF_K
_BPF_RET = 0x06  # BPF_RET | BPF_K
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000  # | errno
# Offsets in struct seccomp_data: nr, arch, and the low 32 bits of args[0] (both ABIs above are
# little-endian).
_DATA_NR, _DATA_ARCH, _DATA_ARG0_LOW = 0, 4, 16


def _seccomp_filter(abi: _SyscallABI) -> bytes:
    """The filter as packed ``struct sock_filter`` entries (see "Layers of containment")."""
    code: list[tuple[int, str | None, str | None, int]] = []  # (op, jump-if-true, -if-false, k)
    labels: dict[str, int] = {}

    def op(opcode: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        code.append((opcode, jt, jf, k))  # a jump target is a label; None: the next instruction

    op(_BPF_LD_ABS, _DATA_ARCH)
    op(_BPF_JEQ, abi.audit_arch, jf="eperm")  # i386 (int 0x80) entry points on x86_64
    op(_BPF_LD_ABS, _DATA_NR)
    if abi.x32_bit is not None:
        op(_BPF_JGE, abi.x32_bit, jt="eperm")  # x32 syscall numbers
    op(_BPF_JEQ, abi.nr["clone"], jt="clone")
    op(_BPF_JEQ, abi.nr["clone3"], jt="enosys")
    for name in _DENIED_SYSCALLS:
        op(_BPF_JEQ, abi.nr[name], jt="eperm")
    op(_BPF_RET, _SECCOMP_RET_ALLOW)
    labels["clone"] = len(code)  # clone(flags, ...): no namespace flag
    op(_BPF_LD_ABS, _DATA_ARG0_LOW)
    op(_BPF_JSET, _CLONE_NEW_FLAGS, jt="eperm")
    op(_BPF_RET, _SECCOMP_RET_ALLOW)
    labels["eperm"] = len(code)
    op(_BPF_RET, _SECCOMP_RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(code)
    op(_BPF_RET, _SECCOMP_RET_ERRNO | errno.ENOSYS)

    def offset(pc: int, label: str | None) -> int:  # jumps are relative to the next instruction
        return 0 if label is None else labels[label] - pc - 1

    return b"".join(struct.pack("HBBI", opcode, offset(pc, jt), offset(pc, jf), k)
                    for pc, (opcode, jt, jf, k) in enumerate(code))


@functools.cache
def _seccomp_for_host() -> tuple[_SyscallABI | None, str | None]:
    """(ABI, filter as hex) for this machine, or (None, None) where no filter is defined."""
    abi = _SYSCALL_ABIS.get(os.uname().machine)
    return (abi, _seccomp_filter(abi).hex()) if abi else (None, None)
