"""Rule-based feedback for code: run the candidate in a sandbox, and judge it here.

The candidate never runs in this process, and nothing it writes decides its score. Its code runs in a
fresh sandboxed child (:mod:`rosa2_dspy.feedback.sandbox`) that only answers questions over a pipe ("is
``add`` a function?", "call ``add(2, 3)``") with plain data. The test statements run *here*, against
stand-ins that forward each call to the child. So the comparisons, the count of passed asserts and the
score are the checker's own: the candidate cannot forge a result file, rewrite or clear the tests, exit
early with a good status or return an object that equals everything; the expected values never enter the
sandbox. Score = share of asserts passed; the feedback names the first failing assert and its
(truncated) error.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
import textwrap
import threading
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text
from rosa2_dspy.feedback.sandbox import Child, ChildGone, Sandbox, describe_exception

__all__ = ["CodeVerifier", "complete_code", "defines", "drop_broken_tail", "split_asserts", "strip_fences"]

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.S)
_MESSAGE_LIMIT = 300  # characters of a failure message shown in the feedback


# CPython 3.11's AST constructor is not thread-safe: threads parsing at once can raise "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905; seen here with 4 verifier threads on HumanEval).
# Experiments verify on a thread pool, so every parse in this process takes this lock.
_AST_LOCK = threading.Lock()


def _parse(source: str) -> ast.Module:
    with _AST_LOCK:
        return ast.parse(source)


def _free_names(statements: list[str], entry_point: str | None) -> list[str]:
    """Names the tests read that are not built-ins: those the candidate's code may define."""
    names = {node.id for s in statements for node in ast.walk(_parse(s))
             if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and not hasattr(builtins, node.id)}
    return sorted(names | ({entry_point} if entry_point else set()))


class _CandidateError(Exception):
    """What the candidate's code raised in the child, as its description."""

class _Remote:
    """Stands in for one of the candidate's callables: each call runs in the child, only plain data comes back."""

    def __init__(self, child: Child, name: str) -> None:
        self.child, self.name = child, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kind, value = self.child.request("call", [self.name, list(args), kwargs])
        if kind == "raised":
            raise _CandidateError(value)
        return value

    def __repr__(self) -> str:
        return f"<{self.name} in the sandbox>"


def _clip(message: str) -> str:
    return message if len(message) <= _MESSAGE_LIMIT else message[:_MESSAGE_LIMIT] + "…"


def _is_test(node: ast.AST) -> bool:
    """A scored test: an ``assert`` statement, or a compound statement (a loop of them) that holds one."""
    return any(isinstance(inner, ast.Assert) for inner in ast.walk(node))


def _failing_line(statement: str, exc: BaseException) -> int | None:
    """The line of ``statement`` (1-based) where ``exc`` was raised from, as the test's own frame saw it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "tests.py":
        tb = tb.tb_next
    return tb.tb_lineno if tb is not None else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _check(statement: str, namespace: dict[str, Any]) -> str | None:
    """Run one test statement here; None if it passed, else its (truncated) error.

    An assert that compares says what its left side gave (``got``); one inside a loop is named, with
    the values of the plain variables it reads at the failing iteration.
    """
    try:
        exec(compile(statement, "tests.py", "exec"), namespace)
        return None
    except Exception as exc:
        message = _clip(str(exc) if isinstance(exc, _CandidateError) else describe_exception(exc))
        tree = _parse(statement)
        line = _failing_line(statement, exc)
        node = max((n for n in ast.walk(tree) if isinstance(n, ast.Assert) and line is not None
                    and n.lineno <= line <= (n.end_lineno or n.lineno)), key=lambda n: n.lineno, default=None)
        if node is None:
            return message
        if node is not tree.body[0]:
            names = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in namespace
                            and type(namespace[n.id]) in (bool, int, float, str, list, tuple, dict, set)})
            values = ", ".join(f"{name} = {_shown(namespace[name])}" for name in names)
            message += f" at `{ast.unparse(node)}`" + (f" with {values}" if values else "")
        if isinstance(exc, AssertionError) and isinstance(node.test, ast.Compare):
            try:
                with _AST_LOCK:  # compiling an AST object converts it back: the same thread-unsafe code
                    left = compile(ast.Expression(node.test.left), "tests.py", "eval")
                got = eval(left, namespace)
                message += f" (got {_shown(got)})"
            except Exception:
                pass
        return message


def strip_fences(text: str | None) -> str:
    """The code inside the first ``` fence (an unclosed one too), or the text itself if there is none."""
    if not text:
        return ""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines the function ``name`` at its top level (by its text, if it does not parse)."""
    try:
        tree = _parse(code)
    except SyntaxError:
        return re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body)


def drop_broken_tail(code: str, entry_point: str) -> tuple[str, int] | None:
    r"""The longest run of whole top-level statements at the start of ``code`` that parses and defines
    ``entry_point``, and the line where the rest begins; None when ``code`` parses or no such run exists.

    A small model often writes its function, starts writing it again and runs out of tokens inside the
    docstring: its answer is the first copy, not the syntax error at the cut (evalplus' ``sanitize`` reads
    answers the same way). A syntax error inside the function itself stays one: nothing before it
    defines the function.

    >>> drop_broken_tail("def f():\n    return 1\n\ndef f():\n    '''unfinis", "f")
    ('def f():\n    return 1', 4)
    """
    try:
        _parse(code)
        return None
    except SyntaxError:
        pass
    lines = code.splitlines()
    starts = [i for i, line in enumerate(lines) if i and line[:1] not in ("", " ", "\t", "#", ")", "]", "}")]
    for cut in reversed(starts):
        head = "\n".join(lines[:cut]).rstrip()
        try:
            _parse(head)
        except SyntaxError:
            continue
        if defines(head, entry_point):
            return head, cut + 1
    return None


def complete_code(prompt: str, code: str, entry_point: str) -> str:
    r"""The program a candidate completing a HumanEval-style ``prompt`` (imports, helpers, a stub) stands for.

    A candidate that defines ``entry_point`` (the whole function, as a DSPy program usually writes it) runs
    after the prompt, so the prompt's imports and helpers are there and its definition replaces the prompt's
    stub; any other candidate is a body-only completion, indented under the prompt's last function (what
    HumanEval's harness does with prompt + completion).

    >>> complete_code("def inc(x):\n    'x + 1'\n", "return x + 1", "inc").splitlines()[-1]
    '    return x + 1'
    """
    code = code.strip("\n")
    if defines(code, entry_point):
        return f"{prompt.rstrip()}\n\n\n{code}\n"
    return prompt.rstrip("\n") + "\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\n"


def split_asserts(tests: str) -> list[str]:
    """Split a block of test statements into one source string per top-level statement."""
    try:
        tree = _parse(tests)
    except SyntaxError as err:
        raise ValueError(f"The example's tests are not valid Python ({err}); fix the dataset's 'tests' field.") from err
    statements = [ast.get_source_segment(tests, node) or ast.unparse(node) for node in tree.body]
    if not any(_is_test(node) for node in tree.body):
        raise ValueError("The example's tests contain no `assert` statement; write tests as `assert f(x) == y` lines.")
    return statements


class CodeVerifier:
    """Feedback source for code tasks: the fraction of the example's asserts the candidate passes.

    ``tests`` is a string of statements (asserts, plus optional setup lines that are not scored); they run
    in this process (they are trusted), the candidate's code in a sandboxed child with ``memory_mb`` of
    address space and a wall-clock ``timeout`` for the whole run. ``sandbox``: ``"auto"`` (namespaces when
    they work here, else a plain child process and one warning), ``"namespaces"`` (refuse to run without
    them) or ``"process"`` (always a plain child process). :attr:`protections` lists what is active.
    With ``prompt_field``, the candidate completes the example's prompt (HumanEval's form): a whole function
    or a body-only completion, see :func:`complete_code`.
    """

    def __init__(self, code_field: str = "code", tests_field: str = "tests", entry_point_field: str = "entry_point",
                 timeout: float = 5.0, memory_mb: int | None = 512, sandbox: str = "auto",
                 prompt_field: str | None = None) -> None:
        self.code_field, self.tests_field, self.entry_point_field = code_field, tests_field, entry_point_field
        self.prompt_field = prompt_field
        self.sandbox = Sandbox(sandbox, timeout=timeout, memory_mb=memory_mb)

    @property
    def protections(self) -> frozenset[str]:
        """The protections active for this verifier's runs on this machine (see the README's table)."""
        return self.sandbox.protections

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        tests = field_text(example, self.tests_field)
        if tests is None:
            raise ValueError(f"CodeVerifier needs assert statements in the example's '{self.tests_field}' field; "
                             "set tests_field= to the field that holds them.")
        statements = split_asserts(tests)
        is_test = [_is_test(_parse(s).body[0]) for s in statements]
        code = strip_fences(field_text(prediction, self.code_field))
        verdict = functools.partial(dspy.Prediction, protections=tuple(sorted(self.protections)))
        if not code.strip():
            return verdict(score=0.0, solved=False,
                           feedback="I could not find any code; reply with the Python function definition.")
        entry_point = field_text(example, self.entry_point_field)
        kept = drop_broken_tail(code, entry_point) if entry_point else None
        note = ""
        if kept is not None:
            code, line = kept
            note = (f"Your code breaks off at line {line} (from there on it does not parse: writing the function "
                    f"again until the length limit does that), so I ran the lines before it. ")
        prompt = field_text(example, self.prompt_field) if self.prompt_field else None
        if prompt is not None and entry_point is not None:
            code = complete_code(prompt, code, entry_point)
        outcome = self.run(code, statements, entry_point)
        if "error" in outcome:
            return verdict(score=0.0, solved=False, feedback=note + outcome["error"])
        results = [r for r, scored in zip(outcome["results"], is_test, strict=True) if scored]
        passed = sum(r is None for r in results)
        score = passed / len(results) if results else 0.0
        failed = next(((s, r) for s, r in zip(statements, outcome["results"]) if r is not None), None)
        if failed is None and results:
            return verdict(score=score, solved=True, feedback=note + f"All {len(results)} tests passed.")
        if failed is None:
            return verdict(score=0.0, solved=False, feedback="The example has no tests to run.")
        shown = failed[0] if "\n" not in failed[0] else failed[0].splitlines()[0] + " …"
        text = note + f"{passed} of {len(results)} tests passed. The first failure: `{shown}` raised {failed[1]}."
        if failed[1].startswith("MemoryError"):
            text += f" It ran out of memory (limit {self.sandbox.memory_mb} MB)."
        return verdict(score=score, solved=False, feedback=text)

    def run(self, code: str, statements: list[str], entry_point: str | None = None) -> dict[str, Any]:
        """Load ``code`` in a sandboxed child, then run each statement here against it.

        Returns {"results": [None | error text, one per statement]} or {"error": text}.
        """
        try:
            with self.sandbox.child() as child:
                return self._judge(child, code, statements, entry_point)
        except ChildGone as gone:
            if gone.timed_out:
                return {"error": f"Your code did not finish within {self.sandbox.timeout:g} s; look for an "
                                 "infinite loop or a far too slow algorithm."}
            return {"error": f"Your code stopped the checker's run: {gone.reason}."}

    def _judge(self, child: Child, code: str, statements: list[str], entry_point: str | None) -> dict[str, Any]:
        kind, loaded = child.request("exec", code)
        if kind == "raised":
            if loaded.startswith("MemoryError"):
                return {"error": f"Your code ran out of memory (limit {self.sandbox.memory_mb} MB): {_clip(loaded)}."}
            return {"error": f"Your code failed to run: {_clip(loaded)}."}
        namespace: dict[str, Any] = {"__name__": "tests"}
        for name in _free_names(statements, entry_point):
            kind, value = child.request("get", name)
            if kind != "raised":
                namespace[name] = _Remote(child, name) if kind == "callable" else value
        if entry_point and entry_point not in namespace:
            return {"error": f"Your code does not define `{entry_point}`; name the function exactly that."}
        return {"results": [_check(statement, namespace) for statement in statements]}
