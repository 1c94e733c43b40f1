"""A chat adapter that small local models can satisfy.

DSPy's ``ChatAdapter`` asks the model to answer in ``[[ ## field ## ]]`` sections and raises when a
section is missing; its fallback, ``JSONAdapter``, asks for JSON. A 135M-parameter instruct model
follows neither reliably, so one dropped marker would end a multi-turn interaction with an exception
instead of a (wrong) answer that feedback can correct. :class:`LenientChatAdapter` formats prompts
exactly like ``ChatAdapter`` and parses the same way when it can; when sections are missing it keeps
the sections it found and gives the unlabelled text to the missing output field, so every turn yields
a prediction.

:class:`PlainChatAdapter` drops the markers altogether, for small chat models: the instructions go in
the system turn, the inputs are a plain user message, and a signature's single output field is the
whole reply. :func:`answer_parsed` is the parse-rate rule both are measured by
(``programs/bench_adapters.py``).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from typing import Any

from dspy.adapters.base import Adapter
from dspy.adapters.chat_adapter import ChatAdapter, field_header_pattern
from dspy.adapters.utils import format_field_value, get_annotation_name, parse_value
from dspy.utils.exceptions import AdapterParseError


class LenientChatAdapter(ChatAdapter):
    """``ChatAdapter`` that never gives up on a completion (see the module docstring for the rule).

    Lenient parse, when the strict one fails: text under a known ``[[ ## field ## ]]`` header goes to
    that field; text under no header (or under an unknown one) is "unlabelled". Missing output fields
    other than the last one get ``""``; the last missing one gets the unlabelled text.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        try:
            return super().parse(signature, completion)
        except AdapterParseError:
            pass
        found: dict[str, list[str]] = {}
        unlabelled: list[str] = []
        current: list[str] = unlabelled
        for line in completion.splitlines():
            match = field_header_pattern.match(line.strip())
            if match:
                name = match.group(1)
                current = found.setdefault(name, []) if name in signature.output_fields else unlabelled
                rest = line.strip()[match.end() :].strip()
                if rest:
                    current.append(rest)
            else:
                current.append(line)
        missing = [name for name in signature.output_fields if name not in found]
        fields: dict[str, Any] = {}
        for name, field in signature.output_fields.items():
            if name in found:
                text = "\n".join(found[name]).strip()
            elif name == missing[-1]:
                text = "\n".join(unlabelled).strip()
            else:
                text = ""
            try:
                fields[name] = parse_value(text, field.annotation)
            except ValueError as err:
                raise AdapterParseError(
                    adapter_name="LenientChatAdapter",
                    signature=signature,
                    lm_response=completion,
                    message=f"Field {name} needs a {field.annotation}, got {text!r}: {err}",
                ) from err
        return fields


class PlainChatAdapter(Adapter):
    """A DSPy adapter for small chat models: plain chat turns, no field markers.

    * **system turn**: the signature's instructions, then the fields' own descriptions (only those a
      signature states; DSPy's ``${name}`` placeholders are left out) and, for several output fields,
      the reply's form: one ``name: value`` line per field, in order.
    * **user turn**: the inputs. One input field: just its value. Several: ``name: value`` lines.
    * **reply**: one output field: the whole reply is its value (a leading ``answer:`` label or DSPy
      markers the model adds anyway are dropped). Several output fields: a line starting with a field's
      name and a colon (``answer:``, ``**Answer:**``, ``[[ ## answer ## ]]``, case-insensitive) opens
      that field; text before the first label belongs to the first field if it has none; a last field
      that never got a label takes the reply's last line (small models end with "So the answer is 12.").
      Other missing fields are ``""``, and so is every field of an empty reply; typed fields go through
      DSPy's ``parse_value`` (a ``list[str]`` also accepts one bullet per line).
    * **demos** are user/assistant turns in the same form; a ``dspy.History`` input becomes earlier
      turns (DSPy's own ``format``), and :class:`ConversationAdapter` replays a conversation over it.

    Example (runs as is; ``DummyLM`` answers in this adapter's form):
        >>> import dspy
        >>> from dspy.utils.dummies import DummyLM
        >>> adapter = PlainChatAdapter()
        >>> adapter.format(dspy.Signature("question -> answer", "Answer in meters."), [], {"question": "3 km?"})
        [{'role': 'system', 'content': 'Answer in meters.'}, {'role': 'user', 'content': '3 km?'}]
        >>> lm = DummyLM([{"reasoning": "1 km is 1000 m.", "answer": "3000 m"}], adapter=adapter)
        >>> with dspy.context(lm=lm, adapter=adapter):
        ...     dspy.ChainOfThought("question -> answer")(question="3 km?").answer
        '3000 m'
    """

    def _call_postprocess(self, processed_signature: Any, original_signature: Any, outputs: list, lm: Any,
                          lm_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        # An empty reply (the model ended its turn at once) is an empty answer, not an exception that would
        # end the conversation: feedback on it ("I got no answer") can still correct the next turn.
        outputs = [(" " if isinstance(o, str) and not o.strip() else
                    {**o, "text": " "} if isinstance(o, dict) and not (o.get("text") or "").strip()
                    and not o.get("tool_calls") else o) for o in outputs]
        return super()._call_postprocess(processed_signature, original_signature, outputs, lm, lm_kwargs)

    def format_system_message(self, signature: Any) -> str:
        parts = [textwrap.dedent(signature.instructions).strip()]
        described = [f"- {name}: {_desc(name, field)}" for name, field in signature.fields.items()
                     if _desc(name, field)]
        if described:
            parts.append("Fields:\n" + "\n".join(described))
        if len(signature.output_fields) > 1:
            lines = [f"{name}: <{_desc(name, field) or name.replace('_', ' ')}{_type_hint(field)}>"
                     for name, field in signature.output_fields.items()]
            parts.append("Reply in this form, one field per line:\n" + "\n".join(lines))
        elif _type_hint(next(iter(signature.output_fields.values()), None)):
            name, field = next(iter(signature.output_fields.items()))
            parts.append(f"Reply with the {name.replace('_', ' ')} only{_type_hint(field)}.")
        return "\n\n".join(p for p in parts if p)

    def format_user_message_content(self, signature: Any, inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        fields = {k: v for k, v in signature.input_fields.items() if k in inputs}
        if len(signature.input_fields) == 1 and fields:
            (name, field), = fields.items()
            body = str(format_field_value(field_info=field, value=inputs[name]))
        else:
            body = "\n".join(f"{k}: {format_field_value(field_info=v, value=inputs[k])}" for k, v in fields.items())
        return "\n\n".join(p for p in (prefix, body, suffix) if p).strip()

    def format_assistant_message_content(self, signature: Any, outputs: dict[str, Any],
                                         missing_field_message: str | None = None) -> str:
        return self._lines({name: outputs.get(name, missing_field_message) for name in signature.output_fields},
                           signature.output_fields)

    def format_field_with_value(self, fields_with_values: dict[Any, Any], role: str | None = None) -> str:
        """Values in the reply form (what ``DummyLM(adapter=PlainChatAdapter())`` answers with)."""
        return self._lines({f.name: v for f, v in fields_with_values.items()},
                           {f.name: f.info for f in fields_with_values})

    @staticmethod
    def _lines(values: dict[str, Any], fields: dict[str, Any]) -> str:
        text = {k: "" if v is None else str(format_field_value(field_info=fields[k], value=v))
                for k, v in values.items()}
        if len(text) == 1:
            return next(iter(text.values()))
        return "\n".join(f"{k}: {v}" for k, v in text.items())

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        names = list(signature.output_fields)
        label = _label_pattern(names)
        found: dict[str, list[str]] = {}
        lead: list[str] = []
        current = lead
        for line in completion.splitlines():
            match = label.match(line)
            if match:
                name = match.group("mname") or match.group("lname")
                if name:  # an output field's label opens its section
                    current = found.setdefault(_field_named(name, names), [])
                # else a marker of no output field ([[ ## completed ## ]], an echoed input's): dropped
                rest = match.group("rest").strip()
                if rest:
                    current.append(rest)
            else:
                current.append(line)
        texts = {name: "\n".join(lines).strip() for name, lines in found.items()}
        leading = "\n".join(lead).strip()
        if len(names) == 1:
            texts.setdefault(names[0], leading)
        else:
            if leading and names[0] not in texts:
                texts[names[0]] = leading
            if names[-1] not in texts:  # never labelled: the reply's last line, without its label
                content = [(m.group("rest") if (m := label.match(line)) else line).strip()
                           for line in completion.splitlines()]
                texts[names[-1]] = next((line for line in reversed(content) if line), "")
        fields = {}
        for name, field in signature.output_fields.items():
            fields[name] = _parse_field(texts.get(name, ""), field, signature, completion)
        return fields


def _desc(name: str, field: Any) -> str:
    desc = (field.json_schema_extra or {}).get("desc", "")
    return "" if desc == f"${{{name}}}" else desc


def _type_hint(field: Any) -> str:
    if field is None or field.annotation is str:
        return ""
    json = "" if field.annotation in (int, float, bool) else " (JSON)"
    return f", as {get_annotation_name(field.annotation)}{json}"


def _label_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(
        sorted((re.escape(n).replace("_", "[_ ]") for n in names), key=len, reverse=True))
    return re.compile(
        rf"^\s*(?:\[\[ ## (?:(?P<mname>{alternatives})|\w+) ## \]\]"
        rf"|[#>*_\-\s]*(?P<lname>{alternatives})[*_]*\s*:[*_]*)(?P<rest>.*)$",
        re.IGNORECASE,
    ) if alternatives else re.compile(r"(?!)")


def _field_named(text: str, names: list[str]) -> str:
    key = text.lower().replace(" ", "_")
    return next(n for n in names if n.lower() == key)


def _parse_field(text: str, field: Any, signature: Any, completion: str) -> Any:
    try:
        return parse_value(text, field.annotation)
    except ValueError:
        if field.annotation == list[str]:
            items = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip() for line in text.splitlines()]
            return [item for item in items if item]
        raise AdapterParseError(adapter_name="PlainChatAdapter", signature=signature, lm_response=completion,
                                message=f"Output field needs a {field.annotation}, got {text!r}") from None


# Whole or half-remembered DSPy field markers: "[[ ## answer ## ]]", "[## answer]", "## answer ##]".
_MARKER_ECHO = re.compile(r"\[+\s*#+|#+\s*\]+")


def answer_parsed(answer: Any, inputs: dict[str, Any], messages: Iterable[dict[str, Any]] = ()) -> bool:
    """The parse-rate rule: was an answer found that is not an echo of the prompt?

    False when the answer is empty, when it holds a DSPy field marker (whole or half-remembered, as in
    ``[## answer]``), when it contains an input's value verbatim (an echo of the question; inputs under
    8 characters are not checked), or when one of its lines of 20 characters or more is a verbatim copy
    of the prompt (the system or user messages). Comparisons ignore case and whitespace runs. A short
    answer that happens to occur in the prompt ("3 km" for "How far is 3 km?") counts as an answer.
    """
    text = _norm("" if answer is None else str(answer))
    if not text or _MARKER_ECHO.search(text):
        return False
    for value in inputs.values():
        value = _norm(str(value))
        if len(value) >= 8 and value in text:
            return False
    prompt = _norm("\n".join(str(m.get("content") or "") for m in messages if m.get("role") != "assistant"))
    return not any(len(line) >= 20 and line in prompt for line in (_norm(x) for x in str(answer).splitlines()))


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


class ConversationAdapter(Adapter):
    """Static mode's context: earlier turns and their feedback replayed as chat messages, in the form of a
    base adapter (``base``: default :class:`LenientChatAdapter`; ROSA2 passes its own adapter).

    For each predictor, its own earlier inputs/outputs become user/assistant turns, each later user turn
    starting with the feedback the previous answer got; parsing is the base adapter's. A predictor's turns
    are found by its signature (``id``), else, for a signature a module derived from it (``dspy.Refine``
    appends a ``hint_`` input), by its instructions and output fields when those name one predictor.

    :meth:`bound` puts the turns (and the base) on a class of their own, so a module that re-creates the
    configured adapter from its class (``dspy.Refine``: ``class Wrapper(adapter.__class__)``, then
    ``Wrapper()``) keeps the conversation.
    """

    turns_by_signature: dict[int, list[tuple[dict, dict, str]]] = {}
    turns_by_words: dict[tuple, list[tuple[dict, dict, str]]] = {}
    base: Adapter | None = None

    def __init__(self, turns_by_signature: dict[int, list[tuple[dict, dict, str]]] | None = None,
                 base: Adapter | None = None, **kwargs: Any) -> None:
        super().__init__()
        if turns_by_signature is not None:
            self.turns_by_signature = turns_by_signature
        if base is not None:
            self.base = base
        elif self.base is None:
            self.base = LenientChatAdapter(**kwargs)

    @classmethod
    def bound(cls, turns: list[tuple[Any, list[tuple[dict, dict, str]]]],
              base: Adapter | None = None) -> "ConversationAdapter":
        """An adapter for ``turns``: ``(signature, its predictor's earlier turns)`` per predictor, replayed in
        ``base``'s form (default :class:`LenientChatAdapter`)."""
        by_words: dict[tuple, list] = {}
        for signature, past in turns:
            key = _words(signature)
            by_words[key] = None if key in by_words else past  # None: two predictors share the key
        attributes = {"turns_by_signature": {id(signature): past for signature, past in turns},
                      "turns_by_words": {k: v for k, v in by_words.items() if v is not None},
                      "base": base if base is not None else LenientChatAdapter()}
        return type(cls.__name__, (cls,), attributes)()

    def format(self, signature: Any, demos: list, inputs: dict) -> list[dict[str, Any]]:
        messages = self.base.format(signature, demos, inputs)
        turns = self.turns_by_signature.get(id(signature)) or self.turns_by_words.get(_words(signature), [])
        if not turns:
            return messages
        conversation, previous_feedback = [], ""
        for past_inputs, past_outputs, feedback in turns:
            user = self.format_user_message_content(signature, past_inputs)
            conversation.append({"role": "user", "content": _with_feedback(previous_feedback, user)})
            conversation.append(
                {"role": "assistant", "content": self.format_assistant_message_content(signature, past_outputs)}
            )
            previous_feedback = feedback
        last = dict(messages[-1])
        last["content"] = _with_feedback(previous_feedback, last["content"])
        return messages[:-1] + conversation + [last]

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        return self.base.parse(signature, completion)

    def _call_postprocess(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return self.base._call_postprocess(*args, **kwargs)  # e.g. PlainChatAdapter's empty-reply rule

    def format_user_message_content(self, *args: Any, **kwargs: Any) -> str:
        return self.base.format_user_message_content(*args, **kwargs)

    def format_assistant_message_content(self, *args: Any, **kwargs: Any) -> str:
        return self.base.format_assistant_message_content(*args, **kwargs)


def _words(signature: Any) -> tuple:
    return signature.instructions, tuple(signature.output_fields)


def _with_feedback(feedback: str, content: str) -> str:
    return f"Feedback on your previous answer: {feedback}\n\n{content}" if feedback else content
