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
    starting with the feedback the previous answer got.
    """

    def __init__(self, turns_by_signature: dict[int, list[tuple[dict, dict, str]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turns_by_signature = turns_by_signature

    def format(self, signature: Any, demos: list, inputs: dict) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        turns = self.turns_by_signature.get(id(signature), [])
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


def _with_feedback(feedback: str, content: str) -> str:
    return f"Feedback on your previous answer: {feedback}\n\n{content}" if feedback else content
