"""An OpenAI-compatible ``/v1/chat/completions`` endpoint on 127.0.0.1 that serves scripted replies.

Tests point a real ``dspy.LM("openai/...", api_base=stub.api_base)`` at it, so the whole remote route runs
(DSPy's engine, litellm, HTTP, error mapping, timeouts) without a network. Built on ``pytest-httpserver``'s
:class:`~pytest_httpserver.HTTPServer` (threaded, so a deliberately slow reply does not block the next).

A scripted reply names *values*, not text: :meth:`OpenAIStub.reply` takes the output fields' values, and the
stub writes them in whatever form the request asks for, read from the request's system prompt:

* DSPy's ``ChatAdapter`` ("Your output fields are: 1. `name` (type) ..."): ``[[ ## name ## ]]`` sections;
* DSPy's ``JSONAdapter`` (the same list, plus "a JSON object" or a ``response_format``): a JSON object;
* ``PlainChatAdapter`` ("Reply in this form, one field per line: name: <...>"): ``name: value`` lines;
* anything else: the last scripted value as the whole reply.

Output fields the request asks for but the script does not give get an empty value of their type
(``""``, ``[]``, ``{}``, ``false``, ``0``), so a signature that grows an output still parses.

Example:
    >>> server = OpenAIStub.serve()                                     # doctest: +SKIP
    >>> stub = OpenAIStub(server)
    >>> stub.reply(refined_instruction="Answer in meters.")
    >>> stub.error(500, "overloaded")
    >>> lm = stub.lm(timeout=2)     # dspy.LM("openai/stub-refiner", api_base=stub.api_base, ...)
    >>> ...; stub.requests[0].text  # what the server got
    >>> stub.close(); server.stop()
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import dspy
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

PATH = "/v1/chat/completions"
_CHAT_FIELDS = re.compile(r"Your output fields are:\n((?:\d+\. `\w+` \(.*\n?)+)")
_CHAT_FIELD = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.M)
_PLAIN_FIELDS = re.compile(r"Reply in this form, one field per line:\n((?:\w+: <.*>\n?)+)")
_PLAIN_FIELD = re.compile(r"^(\w+): <.*?(?:, as (.+?)(?: \(JSON\))?)?>$", re.M)


@dataclass
class StubRequest:
    """One request the endpoint got: its JSON body and headers, recorded when it arrived."""

    body: dict[str, Any]
    headers: dict[str, str]
    arrived: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def system(self) -> str:
        return "\n".join(_content(m) for m in self.messages if m.get("role") == "system")

    @property
    def text(self) -> str:
        """Every message's text, joined: what the model was shown."""
        return "\n".join(_content(m) for m in self.messages)


@dataclass
class _Scripted:
    status: int = 200
    fields: dict[str, Any] = field(default_factory=dict)
    body: str | None = None  # a raw body instead of a completion
    content_type: str = "application/json"
    delay: float = 0.0


class OpenAIStub:
    """Serves the scripted replies in order, one per request; a request with none left gets an HTTP 500."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.requests: list[StubRequest] = []
        self._script: deque[_Scripted] = deque()
        self._lock = threading.Lock()
        self._released = threading.Event()  # ends slow replies at close()
        server.expect_request(PATH, method="POST").respond_with_handler(self._handle)

    @staticmethod
    def serve() -> HTTPServer:
        """A started server on 127.0.0.1 at a free port, threaded (a slow reply does not hold up the next).
        One server can back many stubs in turn (a stub's :meth:`close` leaves it running)."""
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        server.start()
        return server

    @property
    def api_base(self) -> str:
        return self.server.url_for("/v1")

    def lm(self, model: str = "stub-refiner", **kwargs: Any) -> dspy.LM:
        """A ``dspy.LM("openai/<model>")`` aimed at this endpoint: no cache, no retries, a short timeout."""
        settings = {"api_base": self.api_base, "api_key": "test", "cache": False, "num_retries": 0, "timeout": 5}
        return dspy.LM(f"openai/{model}", **{**settings, **kwargs})

    def reply(self, delay: float = 0.0, **fields: Any) -> None:
        """Answer the next request with these output field values, after ``delay`` seconds."""
        self._script.append(_Scripted(fields=fields, delay=delay))

    def error(self, status: int, message: str, kind: str = "server_error") -> None:
        """Answer the next request with an OpenAI-style error body and this HTTP status."""
        self._script.append(_Scripted(status=status, body=json.dumps({"error": {"message": message, "type": kind}})))

    def raw(self, body: str, status: int = 200, content_type: str = "text/html") -> None:
        """Answer the next request with this body as is (e.g. a proxy's HTML page)."""
        self._script.append(_Scripted(status=status, body=body, content_type=content_type))

    def close(self) -> None:
        """Release slow replies, forget this stub's script on the server, and raise what went wrong on the
        server's side (a request to another path, an error in the handler)."""
        self._released.set()
        try:
            self.server.check_assertions()
            self.server.check_handler_errors()
        finally:
            self.server.clear()

    def _handle(self, request: Request) -> Response:
        recorded = StubRequest(request.get_json(force=True), dict(request.headers), time.monotonic())
        with self._lock:
            self.requests.append(recorded)
            scripted = self._script.popleft() if self._script else None
        if scripted is None:
            return _json_response({"error": {"message": "OpenAIStub: no scripted reply left", "type": "stub"}}, 500)
        if scripted.delay:
            self._released.wait(scripted.delay)
        if scripted.body is not None:
            return Response(scripted.body, status=scripted.status, content_type=scripted.content_type)
        content = render(recorded, scripted.fields)
        return _json_response({
            "id": f"chatcmpl-stub-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": recorded.body.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(recorded.text.split()), "completion_tokens": len(content.split()),
                      "total_tokens": len(recorded.text.split()) + len(content.split())},
        })


def requested_fields(request: StubRequest) -> tuple[str, dict[str, str]]:
    """The reply form (``markers``, ``json``, ``lines`` or ``text``) and the output fields (name -> type)
    that ``request``'s system prompt asks for."""
    system = request.system
    if found := _CHAT_FIELDS.search(system):
        fields = dict(_CHAT_FIELD.findall(found.group(1)))
        asks_json = "response_format" in request.body or "JSON object" in system
        return ("json" if asks_json else "markers"), fields
    if found := _PLAIN_FIELDS.search(system):
        return "lines", {name: kind or "str" for name, kind in _PLAIN_FIELD.findall(found.group(1))}
    return "text", {}


def render(request: StubRequest, values: dict[str, Any]) -> str:
    """``values`` as the reply text that ``request`` asks for (see the module docstring)."""
    form, fields = requested_fields(request)
    if form == "text":
        return str(list(values.values())[-1]) if values else ""
    full = {name: values.get(name, _empty(kind)) for name, kind in fields.items()}
    if form == "json":
        return json.dumps(full)
    text = {name: value if isinstance(value, str) else json.dumps(value) for name, value in full.items()}
    if form == "lines":
        return "\n".join(f"{name}: {value}" for name, value in text.items())
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in text.items()) + "[[ ## completed ## ]]"


def _empty(kind: str) -> Any:
    kind = kind.lower()
    for prefix, value in (("list", []), ("dict", {}), ("bool", False), ("int", 0), ("float", 0.0)):
        if kind.startswith(prefix):
            return value
    return ""


def _content(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # OpenAI's content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")
