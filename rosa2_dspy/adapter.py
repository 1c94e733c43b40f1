"""A chat adapter that small local models can satisfy.

DSPy's ``ChatAdapter`` asks the model to answer in ``[[ ## field ## ]]`` sections and raises when a
section is missing; its fallback, ``JSONAdapter``, asks for JSON. A 135M-parameter instruct model
follows neither reliably, so one dropped marker would end a multi-turn interaction with an exception
instead of a (wrong) answer that feedback can correct. :class:`LenientChatAdapter` formats prompts
exactly like ``ChatAdapter`` and parses the same way when it can; when sections are missing it keeps
the sections it found and gives the unlabelled text to the missing output field, so every turn yields
a prediction.
"""

from __future__ import annotations

from typing import Any

from dspy.adapters.chat_adapter import ChatAdapter, field_header_pattern
from dspy.adapters.utils import parse_value
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


class ConversationAdapter(LenientChatAdapter):
    """Static mode's context: earlier turns and their feedback replayed as chat messages.

    For each predictor, its own earlier inputs/outputs become user/assistant turns, each later user turn
    starting with the feedback the previous answer got. A predictor's turns are found by its signature
    (``id``), else, for a signature a module derived from it (``dspy.Refine`` appends a ``hint_`` input),
    by its instructions and output fields when those name one predictor.

    :meth:`bound` puts the turns on a class of their own, so a module that re-creates the configured
    adapter from its class (``dspy.Refine``: ``class Wrapper(adapter.__class__)``, then ``Wrapper()``)
    keeps the conversation.
    """

    turns_by_signature: dict[int, list[tuple[dict, dict, str]]] = {}
    turns_by_words: dict[tuple, list[tuple[dict, dict, str]]] = {}

    def __init__(self, turns_by_signature: dict[int, list[tuple[dict, dict, str]]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if turns_by_signature is not None:
            self.turns_by_signature = turns_by_signature

    @classmethod
    def bound(cls, turns: list[tuple[Any, list[tuple[dict, dict, str]]]]) -> "ConversationAdapter":
        """An adapter for ``turns``: ``(signature, its predictor's earlier turns)`` per predictor."""
        by_words: dict[tuple, list] = {}
        for signature, past in turns:
            key = _words(signature)
            by_words[key] = None if key in by_words else past  # None: two predictors share the key
        attributes = {"turns_by_signature": {id(signature): past for signature, past in turns},
                      "turns_by_words": {k: v for k, v in by_words.items() if v is not None}}
        return type(cls.__name__, (cls,), attributes)()

    def format(self, signature: Any, demos: list, inputs: dict) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
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


def _words(signature: Any) -> tuple:
    return signature.instructions, tuple(signature.output_fields)


def _with_feedback(feedback: str, content: str) -> str:
    return f"Feedback on your previous answer: {feedback}\n\n{content}" if feedback else content
