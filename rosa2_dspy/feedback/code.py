"""Rule-based feedback for code: run the candidate in a sandbox, and judge it here.

The candidate never runs in this process, and nothing it writes decides its score. A fresh child
(``python -I -S``, standard library only) executes the candidate's code and then only answers questions
over a pipe: "is ``add`` a function?", "call ``add(2, 3)``". The test statements run *here*, against
stand-ins that forward each call to the child and get back plain data (None, bool, int, float, complex,
str, bytes, and lists, tuples, sets and dicts of them), decoded by a strict parser. So the comparisons,
the count of passed asserts and the score are the checker's own: the candidate cannot forge a result file,
rewrite or clear the tests, exit early with a good status or return an object that equals everything;
the expected values never enter the sandbox.

Where it can (Linux, root, util-linux), the child runs in its own PID, network, mount, IPC and UTS
namespaces (``unshare``), in a root made of read-only binds of the system libraries and Python's own
installation plus an empty ``/tmp``, as the unprivileged user ``nobody`` (``setpriv``, no capabilities,
no new privileges). Elsewhere it falls back, with one warning, to a plain child process.
:attr:`CodeVerifier.protections` says which protections are active; the README has what each means.
Score = share of asserts passed; the feedback names the first failing assert and its (truncated) error.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.S)
_REPLY_LIMIT = 8 * 2**20  # bytes of one answer from the child; more ends the run
_MESSAGE_LIMIT = 300  # characters of a failure message shown in the feedback
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ALWAYS = frozenset({"verdict-in-parent", "clean-environment"})
_POSIX = frozenset({"resource-limits", "process-group-kill"})
_NAMESPACED = frozenset({"pid-namespace", "network-namespace", "private-filesystem", "unprivileged-user",
                         "process-limit"})
SANDBOXES = ("auto", "namespaces", "process")


# --- plain data across the pipe: the same functions run in the child (their source is copied there) ----------

def _encode(value):
    """``value`` as JSON-ready plain data; a TypeError for anything else (subclasses included)."""
    kind = type(value)
    if kind is int and value.bit_length() > 4000:  # beyond what json may write in decimal
        return {"int": hex(value)}
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_encode(item) for item in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_encode(item) for item in value]}
    if kind is dict:
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} is not plain data (None, bool, int, float, complex, str, bytes, "
                    "or lists, tuples, sets and dicts of them)")


def _untag(obj):
    (tag, data), = obj.items()
    makers = {"int": lambda text: int(text, 16), "tuple": tuple, "set": set, "frozenset": frozenset, "dict": dict,
              "bytes": bytes.fromhex, "complex": lambda parts: complex(*parts)}
    return makers[tag](data)


def _decode(line):
    return json.loads(line, object_hook=_untag)


def _describe(exc):
    try:
        text = str(exc)[:1000]
    except BaseException:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc, source):
    """`` at `line`` for the last line of the candidate's code (``solution.py``) in the traceback, else ""."""
    tb, lineno = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "solution.py":
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is None or not 0 < lineno <= len(source) or not source[lineno - 1].strip():
        return ""
    return f" at `{source[lineno - 1].strip()[:200]}`"


# Runs in the child: set the limits, then answer one JSON request per line on the pipe. The candidate may
# take this loop over; that changes only what the child answers, never how the checker judges it.
_SERVE = r'''
def serve():
    workdir, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 0)  # the candidate's stdin and stdout are /dev/null, not the pipe
    os.dup2(2, 1)
    os.chdir(workdir)
    try:
        import resource
    except ImportError:
        resource = None
    limits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_FSIZE", 2**24, 2**24), ("RLIMIT_NPROC", 64, 64),
              ("RLIMIT_CORE", 0, 0)] + ([("RLIMIT_AS", memory, memory)] if memory else [])
    for name, soft, hard in limits:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            pass
    namespace = {"__name__": "__main__"}
    source = []
    for line in requests:
        try:
            kind, arg = _decode(line)
            if kind == "exec":
                source = arg.splitlines()
                exec(compile(arg, "solution.py", "exec"), namespace)
                answer = ["value", None]
            elif kind == "get":
                value = namespace[arg]
                answer = ["callable", None] if callable(value) else ["value", _encode(value)]
            else:
                name, args, kwargs = arg
                answer = ["value", _encode(namespace[name](*args, **kwargs))]
            answer = json.dumps(answer)
        except BaseException as exc:
            answer = json.dumps(["raised", _describe(exc) + _where(exc, source)])
        replies.write(answer.encode() + b"\n")
        replies.flush()
    os._exit(0)

serve()
'''
_CHILD_SOURCE = "import json, os, sys\n\n" + "\n".join(
    inspect.getsource(f) for f in (_encode, _untag, _decode, _describe, _where)) + _SERVE

# Runs as root inside fresh namespaces: a tmpfs root with read-only binds of the system and Python dirs,
# then chroot and drop to nobody. The mounts die with the mount namespace; nothing is left on the host.
_SETUP = r'''
set -eu
root=$1 python=$2 runner=$3 memory=$4 cpu=$5
shift 5
umask 022
mount -t tmpfs -o size=64m,mode=755,nosuid,nodev rosa2-sandbox "$root"
for path in "$@"; do
    if [ -L "$path" ]; then ln -s "$(readlink "$path")" "$root$path"
    elif [ -d "$path" ]; then mkdir -p "$root$path" && mount --bind -o ro,nosuid,nodev "$path" "$root$path"
    fi
done
mkdir -m 1777 "$root/tmp"
exec chroot "$root" setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- "$python" -I -S -c "$runner" /tmp "$memory" "$cpu"
'''


def _python() -> str:
    """The real interpreter behind this one (a venv's python is a link to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_dirs() -> list[str]:
    """The folders the interpreter needs that are not system folders, outermost only."""
    exe = _python()
    dirs = {os.path.realpath(d) for d in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(exe)))}
    dirs = {d for d in dirs if not any(d == s or d.startswith(s + "/") for s in _SYSTEM_DIRS)}
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def _clean_env() -> dict[str, str]:
    env = {"PATH": _PATH if os.name == "posix" else os.defpath, "LC_ALL": "C.UTF-8"}
    if os.name == "nt" and "SYSTEMROOT" in os.environ:  # Windows' Python cannot start without it
        env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
    return env


def _child_argv(namespaced: bool, tmp: str, memory_bytes: int, cpu_seconds: int) -> list[str]:
    limits = [str(memory_bytes), str(cpu_seconds)]
    if not namespaced:
        return [_python(), "-I", "-S", "-c", _CHILD_SOURCE, tmp, *limits]
    return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--",
            "/bin/sh", "-c", _SETUP, "rosa2-sandbox", tmp, _python(), _CHILD_SOURCE, *limits,
            *_SYSTEM_DIRS, *_python_dirs()]


class _Gone(BaseException):
    """The child stopped answering (timeout, exit, garbage); a BaseException so test code cannot catch it."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.timed_out = reason, timed_out


class _CandidateError(Exception):
    """What the candidate's code raised in the child, as its description."""


class _Child:
    """One sandboxed child, asked one JSON request at a time; killed, with all it started, on close."""

    def __init__(self, argv: list[str], cwd: str, timeout: float) -> None:
        self.posix = os.name == "posix"
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(argv, cwd=cwd, env=_clean_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=self.posix)
        self.replies: queue.Queue[bytes] = queue.Queue()
        # A reader thread and a watchdog: a child that neither answers nor reads never blocks the checker.
        threading.Thread(target=self._read, daemon=True).start()
        self.watchdog = threading.Timer(timeout + 1.0, self.kill)
        self.watchdog.daemon = True
        self.watchdog.start()

    def _read(self) -> None:
        with self.proc.stdout:
            while True:
                line = self.proc.stdout.readline(_REPLY_LIMIT + 1)
                self.replies.put(line)
                if not line.endswith(b"\n"):
                    return

    def request(self, kind: str, arg: Any) -> tuple[str, Any]:
        """Send one request; ("value", data) | ("callable", None) | ("raised", text), or raise :class:`_Gone`."""
        message = json.dumps([kind, _encode(arg)]).encode() + b"\n"
        try:
            self.proc.stdin.write(message)
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone; the reply queue says how
        try:
            line = self.replies.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            raise _Gone("timeout", timed_out=True) from None
        if len(line) > _REPLY_LIMIT:
            raise _Gone(f"it sent back more than {_REPLY_LIMIT // 2**20} MB at once")
        if not line.endswith(b"\n"):
            raise _Gone(self._exit_reason())
        try:
            kind, payload = _decode(line)
            if kind not in ("value", "callable", "raised") or (kind == "raised" and not isinstance(payload, str)):
                raise ValueError(kind)
        except Exception:
            raise _Gone("it wrote something other than an answer on the checker's pipe") from None
        return kind, payload

    def _exit_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=max(0.5, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "it closed the checker's pipe"
        if code < 0:
            name = signal.Signals(-code).name
            limit = " (the CPU, memory or file-size limit?)" if name in ("SIGKILL", "SIGXCPU", "SIGXFSZ") else ""
            return f"killed by signal {name}{limit}"
        return f"the process exited with status {code}"

    def kill(self) -> None:
        """SIGKILL the child's process group (and so, with namespaces, unshare and the namespace's init)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.posix else self.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def close(self, graceful: bool) -> None:
        """Stop the child and everything it started before returning.

        With namespaces, the child's init is killed first (or leaves at the end of its input), and unshare
        returns only once the kernel has killed and reaped every process in that PID namespace. Then the
        process group is killed: the fallback's sweep, and a no-op with namespaces.
        """
        self.watchdog.cancel()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if not graceful:
            self._kill_init()
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        self.proc.wait()

    def _kill_init(self) -> None:
        """SIGKILL unshare's child (the namespace's init); a plain child is killed with its group in close()."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@functools.cache
def _why_no_namespaces() -> str | None:
    """Why the namespace sandbox cannot run here, or None when a trial run works (probed once per process)."""
    if not sys.platform.startswith("linux"):
        return "it needs Linux"
    if os.geteuid() != 0:
        return "it needs root, to mount a private root and switch to the user nobody"
    missing = [tool for tool in ("unshare", "setpriv", "chroot", "mount") if not shutil.which(tool, path=_PATH)]
    if missing:
        return f"{', '.join(missing)} not found (util-linux and coreutils)"
    with tempfile.TemporaryDirectory(prefix="rosa2-code-") as tmp:
        child = _Child(_child_argv(True, tmp, 0, 10), tmp, timeout=10.0)
        try:
            answer = child.request("exec", "import os\nassert os.getuid() == 65534")
        except _Gone as gone:
            answer = ("gone", gone.reason)
        finally:
            child.close(graceful=True)
    return None if answer == ("value", None) else f"a trial run failed ({answer[1]})"


@functools.cache
def _warn_fallback(why: str) -> None:
    text = (f"rosa2-dspy's code sandbox is not available ({why}); candidate code runs as a plain child "
            "process with a clean environment and time/memory limits, but it can read your files, use the "
            "network, signal your processes and leave processes behind. Run as root on Linux with util-linux "
            "for the full sandbox, or pass CodeVerifier(sandbox='namespaces') to refuse to run without it.")
    logger.warning(text)
    warnings.warn(text, RuntimeWarning, stacklevel=4)


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


class _Remote:
    """Stands in for one of the candidate's callables: each call runs in the child, only plain data comes back."""

    def __init__(self, child: _Child, name: str) -> None:
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
        message = _clip(str(exc) if isinstance(exc, _CandidateError) else _describe(exc))
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
        if sandbox not in SANDBOXES:
            raise ValueError(f"sandbox must be one of {SANDBOXES}, got {sandbox!r}.")
        self.code_field, self.tests_field, self.entry_point_field = code_field, tests_field, entry_point_field
        self.prompt_field = prompt_field
        self.timeout, self.memory_mb, self.sandbox = timeout, memory_mb, sandbox
        if sandbox == "namespaces":
            self._namespaced()

    def _namespaced(self) -> bool:
        why = "sandbox='process' was asked for" if self.sandbox == "process" else _why_no_namespaces()
        if why is not None and self.sandbox == "namespaces":
            raise RuntimeError(f"CodeVerifier(sandbox='namespaces'): the namespace sandbox cannot run here: {why}.")
        if why is not None and self.sandbox == "auto":
            _warn_fallback(why)
        return why is None

    @property
    def protections(self) -> frozenset[str]:
        """The protections active for this verifier's runs on this machine (see the README's table)."""
        if self._namespaced():
            return _ALWAYS | _POSIX | _NAMESPACED
        if os.name != "posix":
            return _ALWAYS
        return _ALWAYS | _POSIX | ({"process-limit"} if os.geteuid() != 0 else set())  # root ignores RLIMIT_NPROC

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
            text += f" It ran out of memory (limit {self.memory_mb} MB)."
        return verdict(score=score, solved=False, feedback=text)

    def run(self, code: str, statements: list[str], entry_point: str | None = None) -> dict[str, Any]:
        """Load ``code`` in a sandboxed child, then run each statement here against it.

        Returns {"results": [None | error text, one per statement]} or {"error": text}.
        """
        namespaced = self._namespaced()
        memory = self.memory_mb * 2**20 if self.memory_mb else 0
        cpu = max(1, int(self.timeout) + 1)
        with tempfile.TemporaryDirectory(prefix="rosa2-code-") as tmp:
            child = _Child(_child_argv(namespaced, tmp, memory, cpu), tmp, self.timeout)
            graceful = True
            try:
                return self._judge(child, code, statements, entry_point)
            except _Gone as gone:
                graceful = False
                if gone.timed_out:
                    return {"error": f"Your code did not finish within {self.timeout:g} s; look for an infinite "
                                     "loop or a far too slow algorithm."}
                return {"error": f"Your code stopped the checker's run: {gone.reason}."}
            finally:
                child.close(graceful)

    def _judge(self, child: _Child, code: str, statements: list[str], entry_point: str | None) -> dict[str, Any]:
        kind, loaded = child.request("exec", code)
        if kind == "raised":
            if loaded.startswith("MemoryError"):
                return {"error": f"Your code ran out of memory (limit {self.memory_mb} MB): {_clip(loaded)}."}
            return {"error": f"Your code failed to run: {_clip(loaded)}."}
        namespace: dict[str, Any] = {"__name__": "tests"}
        for name in _free_names(statements, entry_point):
            kind, value = child.request("get", name)
            if kind != "raised":
                namespace[name] = _Remote(child, name) if kind == "callable" else value
        if entry_point and entry_point not in namespace:
            return {"error": f"Your code does not define `{entry_point}`; name the function exactly that."}
        return {"results": [_check(statement, namespace) for statement in statements]}
