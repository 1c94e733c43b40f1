"""The code checker's sandbox against a candidate that tries to talk its way out (issue 12, item 3).

Each attack runs for real, in both sandboxes this machine offers: "auto" (namespaces where they work)
and "process" (the plain-child fallback). Where a protection depends on the platform, the test reads
what the verifier reports and checks that the behaviour matches the report, in both directions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dspy
import pytest

from rosa2_dspy.feedback import sandbox as sandbox_module
from rosa2_dspy.feedback.code import CodeVerifier

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0"
modes = pytest.mark.parametrize("sandbox", ["auto", "process"])
posix_only = pytest.mark.skipif(os.name != "posix", reason="forks, signals and /proc are POSIX")


def judge(code: str, sandbox: str = "auto", tests: str = ADD_TESTS) -> dspy.Prediction:
    example = dspy.Example(question="Write add(a, b).", entry_point="add", tests=tests)
    return CodeVerifier(sandbox=sandbox, timeout=5.0)(example, dspy.Prediction(code=code))


def assert_fails(verdict: dspy.Prediction, says: str = "") -> None:
    assert verdict.score == 0.0 and verdict.solved is False and isinstance(verdict.feedback, str)
    assert says in verdict.feedback


# --- the verdict is the checker's, not the candidate's ----------------------------------------------------

@modes
def test_a_forged_result_file_and_an_early_clean_exit_score_zero(sandbox) -> None:
    code = ("import json, os\nfor name in ('result.json', 'results.json'):\n"
            "    json.dump({'results': [None, None, None]}, open(name, 'w'))\nos._exit(0)")
    assert_fails(judge(code, sandbox), says="exited with status 0")


@modes
@pytest.mark.parametrize("attack", ["value['tests'][:] = ['assert True']", "value['tests'].clear()"])
def test_replacing_or_clearing_the_tests_through_main_scores_zero(sandbox, attack) -> None:
    code = ("import sys\nfor value in list(vars(sys.modules['__main__']).values()):\n"
            f"    if isinstance(value, dict) and 'tests' in value:\n        {attack}\n"
            "def add(a, b):\n    return None")
    assert_fails(judge(code, sandbox))


@modes
@pytest.mark.parametrize("content", ["not json", '{"results": 5}', '{"error": 5}', "[]", '{"missing": null}'])
def test_malformed_result_files_do_not_crash_the_checker(sandbox, content) -> None:
    code = f"import os\nopen('result.json', 'w').write({content!r})\nos._exit(0)"
    assert_fails(judge(code, sandbox))


@modes
def test_forged_answers_on_stdout_or_any_descriptor_score_zero(sandbox) -> None:
    code = ("import os\nline = b'[\"value\", 5]\\n[\"callable\", null]\\n[\"value\", 0]\\n'\nprint(line.decode() * 5)\n"
            "for fd in range(1, 20):\n    try:\n        os.write(fd, line * 5)\n    except OSError:\n        pass\n"
            "def add(a, b):\n    return -1")
    assert_fails(judge(code, sandbox))


@modes
def test_an_object_that_equals_everything_scores_zero(sandbox) -> None:
    code = ("class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
            "def add(a, b):\n    return Yes(a + b + 1)")
    assert_fails(judge(code, sandbox), says="not plain data")


def test_plain_values_cross_the_pipe_unchanged() -> None:
    value = "(1, 2.5, 'x', b'\\x00', {1: [None, True]}, {3}, frozenset({(4,)}), 1+2j, -0.0, float('inf'), -7**9000)"
    code = f"def add(a, b):\n    return {value}"
    tests = f"assert add(0, 0) == {value}\nassert add(0, 0) != list({value})\nassert type(add(0, 0)[4]) is dict"
    assert judge(code, tests=tests).score == 1.0


def test_the_feedback_echoes_only_a_truncated_failure_message() -> None:
    verdict = judge("def add(a, b):\n    raise ValueError('x' * 100_000)")
    assert_fails(verdict)
    assert "ValueError: xxx" in verdict.feedback and "…" in verdict.feedback and len(verdict.feedback) < 600


# --- isolation: parent, processes, environment, network, files ---------------------------------------------

@posix_only
@modes
def test_the_candidate_cannot_kill_the_checker_when_a_pid_namespace_is_reported(sandbox, tmp_path) -> None:
    # The checker runs in its own process here, so that an unprotected run kills that process, not pytest.
    script = ("import sys\nfrom rosa2_dspy.feedback.code import CodeVerifier\n"
              "out = CodeVerifier(sandbox=sys.argv[1]).run('import os\\nos.kill(os.getppid(), 9)\\n"
              "def add(a, b):\\n    return a + b', ['assert add(1, 2) == 3'], 'add')\nprint('ALIVE', out)")
    done = subprocess.run([sys.executable, "-c", script, sandbox], cwd=Path(__file__).parents[1],
                          env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    if "pid-namespace" in CodeVerifier(sandbox=sandbox).protections:
        assert done.returncode == 0 and "ALIVE" in done.stdout, done.stderr[-2000:]
    else:
        assert done.returncode == -signal.SIGKILL  # the documented limit of the plain-process fallback


def processes_named(marker: str) -> dict[int, str]:
    """pid -> name (argv[0]) of the live processes whose command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else [b""]
        except OSError:
            continue
        if marker.encode() in argv[0]:
            found[int(entry.name)] = argv[0].decode()
    return found


@pytest.fixture
def marker():
    name = f"rosa2-sandbox-test-{uuid.uuid4().hex}"
    yield name
    for pid in processes_named(name):  # never leak a process from the test run, whatever the outcome
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@posix_only
@modes
def test_forked_and_setsid_children_do_not_outlive_the_call(sandbox, marker) -> None:
    sleep = shutil.which("sleep")
    code = (f"import os, time\ndef spawn(detach):\n    if os.fork() == 0:\n        if detach:\n"
            f"            os.setsid()\n            if os.fork():\n                os._exit(0)\n"
            f"        os.execv({sleep!r}, [{marker!r} + ('-detached' if detach else '-grouped'), '30'])\n"
            "started = 0\nfor detach in (False, True):\n    try:\n        spawn(detach)\n        started += 1\n"
            "    except OSError:\n        pass  # RLIMIT_NPROC: a non-root user with many processes may not fork\n"
            "time.sleep(0.3)\ndef spawned():\n    return started\ndef add(a, b):\n    return a + b")
    verdict = judge(code, sandbox, tests=ADD_TESTS + "\nassert spawned() == 2")
    # The children really started: as nobody in the namespace, or as root (whom RLIMIT_NPROC does not bind).
    assert verdict.solved or (os.geteuid() != 0 and "pid-namespace" not in verdict.protections), verdict.feedback
    deadline = time.monotonic() + 1.0
    while processes_named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = list(processes_named(marker).values())
    assert not [name for name in left if name.endswith("-grouped")]  # the process group is always killed
    if "pid-namespace" in verdict.protections:
        assert left == []
    else:
        assert "process-group-kill" in verdict.protections  # setsid escapes it: the documented limit


@modes
def test_the_parent_environment_is_not_visible(sandbox, monkeypatch) -> None:
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("ROSA2_SANDBOX_SECRET", secret)
    verdict = judge("import os\ndef add(a, b):\n    raise ValueError(repr(sorted(os.environ.items())))", sandbox)
    assert "clean-environment" in verdict.protections
    assert "ValueError: [" in verdict.feedback and secret not in verdict.feedback


@modes
def test_sockets_fail_when_network_isolation_is_reported(sandbox) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        verdict = judge("import socket\ndef add(a, b):\n"
                        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n    return a + b",
                        sandbox)
    cut = "network-namespace" in verdict.protections
    assert verdict.solved is not cut, verdict.feedback
    if cut:
        assert "Error" in verdict.feedback


@modes
def test_files_outside_the_sandbox_are_unreadable_when_reported(sandbox, tmp_path) -> None:
    secret = f"the-secret-{uuid.uuid4().hex}"
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    verdict = judge(f"def add(a, b):\n    return open({str(path)!r}).read()", sandbox)
    assert_fails(verdict)
    assert (secret in verdict.feedback) is ("private-filesystem" not in verdict.protections)


# --- what is reported, and the fallback ----------------------------------------------------------------------

@pytest.fixture
def no_unshare(monkeypatch, tmp_path):
    """Make the namespace tools unfindable, as on a machine without util-linux (the probe is re-run)."""
    monkeypatch.setattr(sandbox_module, "_PATH", str(tmp_path))
    sandbox_module._why_no_namespaces.cache_clear()
    sandbox_module._warn_fallback.cache_clear()
    yield
    sandbox_module._why_no_namespaces.cache_clear()
    sandbox_module._warn_fallback.cache_clear()


def test_without_namespaces_auto_falls_back_with_one_warning_and_says_so(no_unshare, recwarn) -> None:
    verdict = judge("def add(a, b):\n    return a + b")
    assert verdict.score == 1.0
    assert judge("def add(a, b):\n    return a + b").score == 1.0
    fallbacks = [w for w in recwarn if "sandbox is not available" in str(w.message)]
    assert len(fallbacks) == 1 and "not found" in str(fallbacks[0].message)
    assert "pid-namespace" not in verdict.protections and "verdict-in-parent" in verdict.protections
    with pytest.raises(RuntimeError, match="cannot run here"):
        CodeVerifier(sandbox="namespaces")


def test_the_sandbox_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="sandbox must be one of"):
        CodeVerifier(sandbox="docker")


# --- the Sandbox on its own ------------------------------------------------------------------------------------

@modes
def test_a_sandbox_child_answers_plain_data_and_is_gone_after_the_block(sandbox) -> None:
    with sandbox_module.Sandbox(sandbox, timeout=5.0).child() as child:
        assert child.request("exec", "x = 6 * 7\ndef f(n):\n    return [n, (n,), {n: b'a'}]") == ("value", None)
        assert child.request("get", "x") == ("value", 42)
        assert child.request("get", "f") == ("callable", None)
        assert child.request("call", ["f", [1], {}]) == ("value", [1, (1,), {1: b"a"}])
        kind, text = child.request("call", ["f", [], {}])
        assert kind == "raised" and text.startswith("TypeError")
    assert child.proc.poll() is not None


@modes
def test_a_sandbox_child_that_hangs_raises_child_gone_and_is_killed(sandbox) -> None:
    with pytest.raises(sandbox_module.ChildGone) as gone:
        with sandbox_module.Sandbox(sandbox, timeout=1.0).child() as child:
            child.request("exec", "while True:\n    pass")
    assert gone.value.timed_out and child.proc.poll() is not None


def test_an_unknown_sandbox_kind_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto"):
        sandbox_module.Sandbox("docker")
