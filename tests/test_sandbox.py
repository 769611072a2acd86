"""The sandbox for generated code: early exits, writes outside its directory, network, fork bombs, infinite loops,
memory hogs and detached children are each contained and scored false; the real HumanEval canonical solutions
pass. Containment that only the namespaces level gives is tested where the machine allows it (root with
util-linux); the CI machine does."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cllm.eval.quality import humaneval_program
from cllm.eval.sandbox import LEVELS, isolation_level, run_python

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
STRONG = isolation_level() == "namespaces"
needs_namespaces = pytest.mark.skipif(not STRONG, reason="needs root with unshare/setpriv (the namespaces level)")
PASSING = "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_pass_fail_and_early_exits(level):
    assert run_python(PASSING, level=level).passed
    assert run_python(PASSING.replace("a + b", "a - b"), level=level).status.startswith("failed: AssertionError")
    # exit code 0 before the tests finish is not a pass: the harness's sentinel never comes
    for early in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"):
        res = run_python(early + PASSING, level=level)
        assert (res.passed, res.status) == (False, "failed: exited before the tests finished"), early
    # printing something that looks like a sentinel before leaving early is not a pass either
    assert not run_python("print('passed')\nprint('0' * 32)\nimport os\nos._exit(0)\n" + PASSING, level=level).passed


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_infinite_loop_memory_hog_and_output_flood(level):
    t0 = time.perf_counter()
    assert run_python("while True:\n    pass\n", timeout=1.5, level=level).status == "timeout"
    assert time.perf_counter() - t0 < 6
    res = run_python("x = bytearray(8 << 30)\n" + PASSING, level=level)
    assert not res.passed and "MemoryError" in res.status
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=20, level=level)
    assert not res.passed and res.status != "timeout"  # the file-size limit stops it long before the timeout


@pytest.mark.parametrize("level", LEVELS if STRONG else ["basic"])
def test_network_is_blocked_even_through_the_raw_socket_module(level):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    for module in ("socket", "_socket"):
        prog = f"import {module}\ns = {module}.socket()\ns.connect(('127.0.0.1', {port}))\n" + PASSING
        res = run_python(prog, level=level)
        assert not res.passed and "OSError" in res.status
    t.join()
    server.close()
    assert got == []  # nothing reached the listener


@needs_namespaces
def test_writes_outside_the_sandbox_do_not_land(tmp_path):
    outside = tmp_path / "escaped.txt"
    repo_file = Path(__file__).resolve().parents[1] / "escaped_by_sandbox.txt"
    for target in (outside, repo_file):
        prog = f"open({str(target)!r}, 'w').write('x')\n" + PASSING
        res = run_python(prog)
        assert not res.passed and ("PermissionError" in res.status or "FileNotFoundError" in res.status)
        assert not target.exists()
    # its own directory is writable
    assert run_python("open('scratch.txt', 'w').write('ok')\n" + PASSING).passed


@needs_namespaces
def test_fork_bomb_is_limited_and_detached_children_die_with_the_sandbox():
    bomb = "import os\nwhile True:\n    os.fork()\n"
    t0 = time.perf_counter()
    res = run_python(bomb, timeout=5)
    assert not res.passed and time.perf_counter() - t0 < 15
    assert run_python(PASSING).passed  # the machine still runs programs afterwards
    marker = "37.123"
    prog = ("import subprocess\nsubprocess.Popen(['sleep', '" + marker + "'], start_new_session=True,"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n" + PASSING)
    assert run_python(prog).passed
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason="HumanEval data not in ../shared/data")
def test_humaneval_canonical_solutions_all_pass():
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    assert len(problems) == 164
    failed = []
    for p in problems:
        prog = humaneval_program(p["prompt"], p["test"], p["entry_point"], p["canonical_solution"])
        res = run_python(prog, timeout=20)
        if not res.passed:
            failed.append((p["task_id"], res.status))
    assert failed == []
