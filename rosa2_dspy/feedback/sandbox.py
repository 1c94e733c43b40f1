"""Where candidate code runs: a fresh child process per run, behind a pipe that carries only plain data.

A fresh child (``python -I -S``, standard library only) executes the candidate's code and then only
answers questions over a pipe: "is ``add`` a function?", "call ``add(2, 3)``"; each answer is plain data
(None, bool, int, float, complex, str, bytes, and lists, tuples, sets and dicts of them), decoded by a
strict parser. What the answers mean is the checker's business (:mod:`rosa2_dspy.feedback.code`).

Where it can (Linux, root, util-linux), the child runs in its own PID, network, mount, IPC and UTS
namespaces (``unshare``), in a root made of read-only binds of the system libraries and Python's own
installation plus an empty ``/tmp``, as the unprivileged user ``nobody`` (``setpriv``, no capabilities,
no new privileges). Elsewhere it falls back, with one warning, to a plain child process.
:attr:`Sandbox.protections` says which protections are active; the README has what each means.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_REPLY_LIMIT = 8 * 2**20  # bytes of one answer from the child; more ends the run
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


class ChildGone(BaseException):
    """The child stopped answering (timeout, exit, garbage); a BaseException so test code cannot catch it."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.timed_out = reason, timed_out


class Child:
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
        """Send one request; ("value", data) | ("callable", None) | ("raised", text), or raise :class:`ChildGone`."""
        message = json.dumps([kind, _encode(arg)]).encode() + b"\n"
        try:
            self.proc.stdin.write(message)
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone; the reply queue says how
        try:
            line = self.replies.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            raise ChildGone("timeout", timed_out=True) from None
        if len(line) > _REPLY_LIMIT:
            raise ChildGone(f"it sent back more than {_REPLY_LIMIT // 2**20} MB at once")
        if not line.endswith(b"\n"):
            raise ChildGone(self._exit_reason())
        try:
            kind, payload = _decode(line)
            if kind not in ("value", "callable", "raised") or (kind == "raised" and not isinstance(payload, str)):
                raise ValueError(kind)
        except Exception:
            raise ChildGone("it wrote something other than an answer on the checker's pipe") from None
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
        child = Child(_child_argv(True, tmp, 0, 10), tmp, timeout=10.0)
        try:
            answer = child.request("exec", "import os\nassert os.getuid() == 65534")
        except ChildGone as gone:
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


describe_exception = _describe  # the child runs its own copy of _describe, under that name


class Sandbox:
    """Runs candidate code in a fresh child per run: ``with sandbox.child() as child: child.request(...)``.

    ``kind``: ``"auto"`` (namespaces when they work here, else a plain child process and one warning),
    ``"namespaces"`` (refuse to run without them) or ``"process"`` (always a plain child process).
    ``timeout``: wall-clock seconds for one whole run; ``memory_mb``: the child's address space (None: no
    limit). A request returns ``("value", data)``, ``("callable", None)`` or ``("raised", text)``, or
    raises :class:`ChildGone` (timeout, crash, garbage on the pipe); the child and all it started are
    killed when the block ends.

    >>> with Sandbox("process").child() as child:
    ...     _ = child.request("exec", "x = 6 * 7")
    ...     child.request("get", "x")
    ('value', 42)
    """

    def __init__(self, kind: str = "auto", timeout: float = 5.0, memory_mb: int | None = 512) -> None:
        if kind not in SANDBOXES:
            raise ValueError(f"sandbox must be one of {SANDBOXES}, got {kind!r}.")
        self.kind, self.timeout, self.memory_mb = kind, timeout, memory_mb
        if kind == "namespaces":
            self.namespaced()

    def namespaced(self) -> bool:
        """Whether runs use the namespaces (probed once per process); warns once when "auto" falls back."""
        why = "sandbox='process' was asked for" if self.kind == "process" else _why_no_namespaces()
        if why is not None and self.kind == "namespaces":
            raise RuntimeError(f"sandbox='namespaces': the namespace sandbox cannot run here: {why}.")
        if why is not None and self.kind == "auto":
            _warn_fallback(why)
        return why is None

    @property
    def protections(self) -> frozenset[str]:
        """The protections active for runs on this machine (see the README's table)."""
        if self.namespaced():
            return _ALWAYS | _POSIX | _NAMESPACED
        if os.name != "posix":
            return _ALWAYS
        return _ALWAYS | _POSIX | ({"process-limit"} if os.geteuid() != 0 else set())  # root ignores RLIMIT_NPROC

    @contextlib.contextmanager
    def child(self) -> Iterator[Child]:
        """A fresh child for one run, in its own empty working folder; stopped, with all it started, at the end."""
        namespaced = self.namespaced()
        memory = self.memory_mb * 2**20 if self.memory_mb else 0
        cpu = max(1, int(self.timeout) + 1)
        with tempfile.TemporaryDirectory(prefix="rosa2-code-") as tmp:
            child = Child(_child_argv(namespaced, tmp, memory, cpu), tmp, self.timeout)
            graceful = True
            try:
                yield child
            except ChildGone:
                graceful = False
                raise
            finally:
                child.close(graceful)
