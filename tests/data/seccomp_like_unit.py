#!/usr/bin/python3
"""Runs a command under a seccomp filter built the way systemd builds the unit's.

    seccomp_like_unit.py "SYSCALLFILTER" [--mdwe] -- COMMAND...

SYSCALLFILTER is the value of the unit's one SystemCallFilter= allow line (groups such as
@system-service, expanded by `systemd-analyze syscall-filter`, and single calls); anything
else fails with EPERM, as SystemCallErrorNumber=EPERM makes it. --mdwe adds what
MemoryDenyWriteExecute=yes filters: mmap of memory both writable and executable, mprotect
and pkey_mprotect to executable. For tests/it/service_unit.rs, which runs a sync under it
(needs Debian's python3-seccomp). systemd as PID 1 would apply the same filter itself.
"""
import errno
import os
import subprocess
import sys

import seccomp

PROT_WRITE, PROT_EXEC = 2, 4


def expand(group, seen):
    """The system calls of a systemd group, its nested groups included."""
    out = set()
    listing = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == group:
            continue
        if line.startswith("@"):
            if line not in seen:
                seen.add(line)
                out |= expand(line, seen)
        else:
            out.add(line)
    return out


def main():
    spec, rest = sys.argv[1], sys.argv[2:]
    mdwe = rest[:1] == ["--mdwe"]
    if mdwe:
        rest = rest[1:]
    if rest[:1] != ["--"] or len(rest) < 2:
        sys.exit("usage: seccomp_like_unit.py SYSCALLFILTER [--mdwe] -- COMMAND...")
    command = rest[1:]

    allowed = set()
    for item in spec.split():
        allowed |= expand(item, {item}) if item.startswith("@") else {item}
    guarded = {"mmap", "mprotect", "pkey_mprotect"} if mdwe else set()

    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed - guarded):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # a call this architecture does not have (32-bit variants)
    if mdwe:
        wx = PROT_WRITE | PROT_EXEC
        for prot in (0, PROT_WRITE, PROT_EXEC):
            f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, prot))
        for name in ("mprotect", "pkey_mprotect"):
            f.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, 0))
    f.load()
    os.execvp(command[0], command)


main()
