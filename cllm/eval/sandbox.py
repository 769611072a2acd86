"""A sandbox for model-generated code (HumanEval scoring): run a program, decide pass/fail from the harness.

Two isolation levels, the strongest the machine allows (`isolation_level()`):

- "namespaces" (root, with util-linux `unshare` and `setpriv`, and an interpreter the unprivileged user can run):
  fresh mount, network and PID namespaces; private tmpfs on /tmp, /var/tmp and /dev/shm; the program runs as
  `nobody` in an empty directory there, so it can write nowhere else; no network at all (a new namespace has only
  a downed loopback); when the program's interpreter (PID 1 of its namespace) ends or is killed, the kernel kills
  every process it left behind, detached ones included.
- "basic" (anything else): a new session in a fresh temp directory, killed as a process group at the timeout; the
  socket module's constructors blocked. Writes outside the directory and children that leave the session are not
  contained at this level, and a fork bomb run as root is not limited: prefer "namespaces" for untrusted code.

Both: resource limits on address space, CPU time, file size and (for `nobody`) the number of processes; output
goes to files, so the file-size limit also bounds it. A pass is decided by the harness, not by the exit code: the
runner prints a random sentinel, sent on stdin and never in the program's text, after the program (which ends
with the tests' `check(...)`) returns; an early `exit(0)` or `os._exit(0)` prints none and fails. This guards
against programs that stop early by accident, not against code written to read the runner's memory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
MAX_PROCESSES = 64  # RLIMIT_NPROC of the sandbox user: counts all of its processes on the machine
MAX_FILE_BYTES = 16 << 20
MAX_MEMORY_BYTES = 2 << 30
LEVELS = ("namespaces", "basic")

# Runs the program given on stdin after the sentinel line; prints the sentinel only if the program returns.
_RUNNER = r'''
import sys
def _main():
    sentinel = sys.stdin.readline().strip()
    source = sys.stdin.read()
    sys.stdin.close()
    import socket, _socket
    def _blocked(*args, **kwargs):
        raise OSError("network disabled by cllm's HumanEval runner")
    for mod in (socket, _socket):
        for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stdout.write("\n" + sentinel + "\n")
    sys.stdout.flush()
_main()
'''

# The namespace's init: private temp filesystems, an empty work dir owned by nobody, then the runner as nobody.
_NS_INIT = ('for d in /tmp /var/tmp /dev/shm; do [ -d "$d" ] && mount -t tmpfs -o size=64m,mode=1777 tmpfs "$d"; '
            'done; mkdir /tmp/w && chown {uid}:{uid} /tmp/w && cd /tmp/w && '
            'exec setpriv --reuid={uid} --regid={uid} --clear-groups -- "$0" -I -c "$1"')


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "timeout", "failed: <last stderr line>" or "failed: exited before the tests finished"
    level: str


def _world_runnable(path: str) -> bool:
    """Can a user with no rights of its own execute `path` (every parent directory searchable by others)?"""
    p = Path(path).resolve()
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


def _interpreter() -> str | None:
    """A Python the sandbox user can run: this one if reachable, else a system python3."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and _world_runnable(cand):
            return cand
    return None


def isolation_level() -> str:
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return "basic"
    return "namespaces" if _interpreter() else "basic"


def _limits(timeout: float, drop_to_nobody: bool):
    import resource

    def apply() -> None:
        cpu = int(timeout) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_AS, (MAX_MEMORY_BYTES, MAX_MEMORY_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to_nobody or os.geteuid() != 0:  # root ignores it; `nobody` and plain users do not
            resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))

    return apply


def _command(level: str, work: str) -> list[str]:
    if level == "namespaces":
        return ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--", "sh", "-c",
                _NS_INIT.format(uid=NOBODY), _interpreter(), _RUNNER]
    return [sys.executable, "-I", "-c", _RUNNER]


def run_python(program: str, timeout: float = 10.0, level: str | None = None) -> RunResult:
    """Run `program` (which ends with its tests) in the sandbox; see the module docstring."""
    level = level or isolation_level()
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {level!r}; choose from {LEVELS}")
    sentinel = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="cllm-sandbox-") as tmp:
        work = os.path.join(tmp, "w")
        os.mkdir(work)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": "/tmp/w" if level == "namespaces" else work,
               "LANG": "C.UTF-8"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(_command(level, work), cwd=work, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True,
                                    preexec_fn=_limits(timeout, level == "namespaces"))
            try:
                proc.communicate((sentinel + "\n" + program).encode(), timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        stdout = Path(out_path).read_bytes().decode("utf-8", "replace")
        stderr = Path(err_path).read_bytes().decode("utf-8", "replace")
    if timed_out:
        return RunResult(False, "timeout", level)
    lines = [x for x in stdout.splitlines() if x.strip()]
    if lines and lines[-1].strip() == sentinel:
        return RunResult(True, "passed", level)
    last = stderr.strip().splitlines()
    reason = last[-1][:200] if last else "exited before the tests finished"
    return RunResult(False, f"failed: {reason}", level)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (under namespaces this also ends the namespace and all it holds)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
