"""Rule-based feedback for code: run the candidate against the task's asserts in a sandboxed subprocess.

The candidate never runs in this process: a fresh ``python -I`` child in an empty temp dir executes it,
with a wall-clock timeout, an address-space limit and a CPU-time limit, and reports per-assert results
as JSON. Score = share of asserts passed; the feedback names the first failing assert and its error.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.S)

# Runs inside the child. Limits are set here, first thing, rather than in preexec_fn: preexec_fn is not
# safe when the parent has threads (torch, dspy), and the child applies them before any candidate code runs.
_RUNNER = r'''
import ast, json, sys
payload = json.load(open("payload.json"))
try:
    import resource
    mem = payload["memory_bytes"]
    if mem:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = payload["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24))
except (ImportError, ValueError, OSError):
    pass

def describe(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

def report(data):
    with open("result.json", "w") as f:
        json.dump(data, f)

ns = {"__name__": "__main__"}
try:
    exec(compile(payload["code"], "solution.py", "exec"), ns)
except BaseException as exc:
    report({"error": describe(exc)})
    sys.exit(0)
entry = payload["entry_point"]
if entry and entry not in ns:
    report({"missing": entry})
    sys.exit(0)
results = []
for test in payload["tests"]:
    try:
        exec(compile(test, "tests.py", "exec"), ns)
        results.append(None)
    except BaseException as exc:
        message = describe(exc)
        node = ast.parse(test).body[0]
        if isinstance(exc, AssertionError) and isinstance(node.test, ast.Compare):
            try:
                got = repr(eval(compile(ast.Expression(node.test.left), "tests.py", "eval"), ns))
                message += f" (got {got[:200]})"
            except BaseException:
                pass
        results.append(message)
report({"results": results})
'''


def strip_fences(text: str | None) -> str:
    """The code inside the first ``` fence (an unclosed one too), or the text itself if there is none."""
    if not text:
        return ""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


def split_asserts(tests: str) -> list[str]:
    """Split a block of test statements into one source string per top-level statement."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as err:
        raise ValueError(f"The example's tests are not valid Python ({err}); fix the dataset's 'tests' field.") from err
    statements = [ast.get_source_segment(tests, node) or ast.unparse(node) for node in tree.body]
    if not any(isinstance(node, ast.Assert) for node in tree.body):
        raise ValueError("The example's tests contain no `assert` statement; write tests as `assert f(x) == y` lines.")
    return statements


class CodeVerifier:
    """Feedback source for code tasks: the fraction of the example's asserts the candidate passes.

    ``tests`` is a string of statements (asserts, plus optional setup lines that are not scored). On POSIX
    the child gets ``memory_mb`` of address space; the wall-clock ``timeout`` kills its whole process group.
    """

    def __init__(self, code_field: str = "code", tests_field: str = "tests", entry_point_field: str = "entry_point",
                 timeout: float = 5.0, memory_mb: int | None = 512) -> None:
        self.code_field, self.tests_field, self.entry_point_field = code_field, tests_field, entry_point_field
        self.timeout, self.memory_mb = timeout, memory_mb

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        tests = field_text(example, self.tests_field)
        if tests is None:
            raise ValueError(f"CodeVerifier needs assert statements in the example's '{self.tests_field}' field; "
                             "set tests_field= to the field that holds them.")
        statements = split_asserts(tests)
        is_assert = [isinstance(ast.parse(s).body[0], ast.Assert) for s in statements]
        code = strip_fences(field_text(prediction, self.code_field))
        if not code.strip():
            return dspy.Prediction(score=0.0, solved=False,
                                   feedback="I could not find any code; reply with the Python function definition.")
        outcome = self.run(code, statements, field_text(example, self.entry_point_field))
        if "error" in outcome:
            return dspy.Prediction(score=0.0, solved=False, feedback=outcome["error"])
        results = [r for r, scored in zip(outcome["results"], is_assert) if scored]
        score = sum(r is None for r in results) / len(results)
        failed = next(((s, r) for s, r in zip(statements, outcome["results"]) if r is not None), None)
        if failed is None:
            return dspy.Prediction(score=score, solved=True, feedback=f"All {len(results)} tests passed.")
        passed = sum(r is None for r in results)
        text = f"{passed} of {len(results)} tests passed. The first failure: `{failed[0]}` raised {failed[1]}."
        if failed[1].startswith("MemoryError"):
            text += f" It ran out of memory (limit {self.memory_mb} MB)."
        return dspy.Prediction(score=score, solved=False, feedback=text)

    def run(self, code: str, statements: list[str], entry_point: str | None = None) -> dict[str, Any]:
        """Run ``code`` then each statement in a sandboxed child; {"results": [None | error]} or {"error": text}."""
        payload = {"code": code, "tests": statements, "entry_point": entry_point,
                   "memory_bytes": self.memory_mb * 2**20 if self.memory_mb else None,
                   "cpu_seconds": max(1, int(self.timeout) + 1)}
        with tempfile.TemporaryDirectory(prefix="rosa2-code-") as tmp:
            Path(tmp, "payload.json").write_text(json.dumps(payload))
            Path(tmp, "runner.py").write_text(_RUNNER)
            posix = os.name == "posix"
            with open(Path(tmp, "stderr.txt"), "wb") as err:
                proc = subprocess.Popen([sys.executable, "-I", "runner.py"], cwd=tmp, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err, start_new_session=posix)
                try:
                    proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL) if posix else proc.kill()
                    proc.wait()
                    return {"error": f"Your code did not finish within {self.timeout:g} s; look for an infinite "
                                     "loop or a far too slow algorithm."}
            result = Path(tmp, "result.json")
            outcome = json.loads(result.read_text()) if result.exists() else None
            stderr = Path(tmp, "stderr.txt").read_bytes()[-2000:].decode(errors="replace")
        if outcome is None:
            last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            if proc.returncode < 0:
                last = [f"killed by signal {signal.Signals(-proc.returncode).name} (a CPU, memory or file-size limit?)"]
            return {"error": f"Your code crashed before reporting any result: {last[0]}."}
        if "missing" in outcome:
            return {"error": f"Your code does not define `{outcome['missing']}`; name the function exactly that."}
        if outcome.get("error", "").startswith("MemoryError"):
            outcome["error"] = f"Your code ran out of memory (limit {self.memory_mb} MB): {outcome['error']}."
        elif "error" in outcome:
            outcome["error"] = f"Your code failed to run: {outcome['error']}."
        return outcome
