"""The structured textual gradient: an instruction as a base text plus a short list of requirements.

The words step (:class:`~rosa2_dspy.words.InstructionRefiner`, ``style="requirements"``) asks its LM for
the requirements the instruction is missing, as a list; this module merges them into the instruction so
that it stays short and current:

* an instruction reads ``<base text>`` then a ``Requirements:`` block of ``- `` lines (:func:`split`,
  :func:`join`);
* a new requirement that says the same as one already there is a **duplicate** (dropped); one about the
  same thing (they share a topic word, e.g. "distances") **replaces** it — the user changed their mind;
  otherwise it is **added**; past ``max_requirements`` the oldest go (:func:`merge`);
* a requirement must be about the user's intent, never one question's answer (:func:`rejection_reason`):
  it may not state "the answer is ...", copy a number of a revealed reference, of the model's answers or of
  the question, or quote an example value from the feedback.

:func:`clean_feedback` takes out of a user's message what is no requirement: quotes of the model's own
answers and the revealed answer (the weights step gets that as a reference, for its own question only).

Example:
    >>> merge("Answer the question.", ["Give distances in meters."]).instruction
    'Answer the question.\\n\\nRequirements:\\n- Give distances in meters.'
    >>> merge(_, ["Give distances in kilometres, as a number followed by km."]).replaced
    ['Give distances in meters.']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

HEADER = "Requirements:"
MAX_REQUIREMENT_CHARS = 200
_BLOCK = re.compile(r"\n*^" + re.escape(HEADER) + r"[ \t]*$", re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_STATES_ANSWER = re.compile(r"\b(?:correct|right|final|the)\s+(?:answer|result|solution)\s+(?:is|was|=|:)\s*\S",
                            re.IGNORECASE)
# A sentence that is nothing but a complaint ("No, that's not right."), and one that calls something wrong
ONLY_COMPLAINT = re.compile(
    r"^\W*(?:(?:no|nope|wrong|incorrect|not quite)\W*)?(?:that'?s (?:not right|not it|wrong|incorrect)\W*)?$"
    r"|^\W*your answer\b.*\bnot what i meant\W*$|^\W*check your work\b|^\W*i got no answer\b",
    re.IGNORECASE)
_CALLS_WRONG = re.compile(r"\b(?:is|was|are|were)\s+(?:wrong|incorrect|not (?:right|correct|what i meant))\b",
                        re.IGNORECASE)
_FIELD_MARKER = re.compile(r"\[+\s*#|#+\s*\]+")
_REVEALED = "\x00"  # stands in for a revealed reference in clean_feedback
# Words that say nothing about what a user asked for (carried_over): function words and feedback's stock words.
_FUNCTION = frozenset("""a an the and or of to in on at as by for with without from into it its is are be that
this not no your you i me my please write give use put make answer answers reply question""".split())
# Words that say nothing about *which* requirement it is: two requirements sharing only these are unrelated.
_GENERIC = frozenset("""a an the and or of to in on at as by for with without from into after before every each all
any only just one your you it its is are be that this than then so do not no never always please make sure
answer answers reply replies result results write writes written give gives use using put number numbers final
value values question questions output outputs response text form format word words should must""".split())


@dataclass
class Merge:
    """What :func:`merge` did: the new instruction and which requirements it added, replaced or dropped."""

    instruction: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # the old requirements that new ones replaced
    duplicates: list[str] = field(default_factory=list)  # new ones already stated
    evicted: list[str] = field(default_factory=list)  # the oldest, dropped past max_requirements

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced)


def split(instruction: str) -> tuple[str, list[str]]:
    """``(base text, requirements)`` of an instruction (no ``Requirements:`` block: no requirements)."""
    match = _BLOCK.search(instruction)
    if not match:
        return instruction.rstrip(), []
    items = [re.sub(r"^\s*[-*•]\s*", "", line).strip() for line in instruction[match.end():].splitlines()]
    return instruction[: match.start()].rstrip(), [item for item in items if item]


def join(base: str, requirements: Sequence[str]) -> str:
    """The instruction text of ``base`` plus ``requirements`` (the inverse of :func:`split`)."""
    if not requirements:
        return base.rstrip()
    return base.rstrip() + f"\n\n{HEADER}\n" + "\n".join(f"- {r}" for r in requirements)


def _topic(text: str, ignore: frozenset[str] = _GENERIC) -> set[str]:
    return {w for w in re.findall(r"[a-z%°]+", text.lower()) if w not in ignore and len(w) > 1 or w in "%°"}


def carried_over(requirement: str, source: str, texts: Iterable[str]) -> bool:
    """Whether ``requirement``, written from ``source`` (it shares content words with it), shares none of
    those words with any of ``texts``: it carries a topic of ``source`` that ``texts`` never raised. Words
    are compared by their first five letters ("distances" meets "distance"); function words and the words
    any feedback uses ("answer", "write", "please") do not count. A requirement that shares nothing with
    ``source`` is generic, never carried over."""
    taken = _content_stems(requirement) & _content_stems(source)
    return bool(taken) and not any(taken & _content_stems(text) for text in texts)


def _content_stems(text: str) -> set[str]:
    return {w[:5] for w in _topic(text, ignore=_FUNCTION)}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9%°]+", text.lower()))


def _same(a: str, b: str) -> bool:
    wa, wb = _words(a), _words(b)
    return bool(wa | wb) and len(wa & wb) / len(wa | wb) >= 0.75


def merge(instruction: str, new: Iterable[str], max_requirements: int = 6) -> Merge:
    """Merge ``new`` requirements into ``instruction``: duplicates dropped, requirements about the same
    topic replaced (the newer wins), the rest added; at most ``max_requirements`` kept (the newest)."""
    base, current = split(instruction)
    result = Merge(instruction)
    for requirement in new:
        requirement = " ".join(requirement.split())
        if not requirement:
            continue
        if any(_same(requirement, old) for old in current):
            result.duplicates.append(requirement)
            continue
        topic = _topic(requirement)
        clashing = [old for old in current if topic & _topic(old)]
        for old in clashing:
            current.remove(old)
        result.replaced.extend(clashing)
        current.append(requirement)
        result.added.append(requirement)
    while len(current) > max_requirements:
        result.evicted.append(current.pop(0))
    if result.changed:
        result.instruction = join(base, current)
    return result


def forbidden_numbers(texts: Iterable[str], feedback: str = "") -> set[str]:
    """Numbers a requirement may not contain: every number in ``texts`` (a revealed reference, the
    model's answers, the question) and every number of two or more digits in the feedback (an example
    value such as "like 12 kg"; single digits stay allowed: "two decimal places", "at most 3 words")."""
    numbers = {_canonical(n) for text in texts for n in _NUMBER.findall(str(text))}
    numbers |= {_canonical(n) for n in _NUMBER.findall(feedback) if len(re.sub(r"\D", "", n)) >= 2}
    return numbers


def _canonical(number: str) -> str:
    return number.replace(",", "")


def rejection_reason(requirement: str, forbidden: set[str], answers: Sequence[str] = (),
                     reference: Sequence[str] = ()) -> str:
    """Why ``requirement`` may not go into the words ("" if it may). ``reference``: a revealed answer's
    values; a requirement that copies a stretch of one (a line of a revealed solution) is refused."""
    text = requirement.strip()
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 3:
        return "not a requirement (too few words)"
    if len(text) > MAX_REQUIREMENT_CHARS:
        return f"too long ({len(text)} > {MAX_REQUIREMENT_CHARS} chars)"
    if _FIELD_MARKER.search(text) or "```" in text:
        return "leaks format markers or code"
    if _STATES_ANSWER.search(text):
        return "states a specific answer"
    if _CALLS_WRONG.search(text) or ONLY_COMPLAINT.match(text):
        return "a complaint, not a requirement"
    if any(_canonical(n) in forbidden for n in _NUMBER.findall(text)):
        return "copies a number of a specific question or answer"
    if echoes(text, reference):
        return "copies the revealed answer"
    if echoes(text, answers):
        return "echoes the model's answer"
    return ""


def echoes(text: str, answers: Sequence[str], span: int = 30, step: int = 5) -> bool:
    """True when ``text`` copies a ``span``-character stretch of one of ``answers`` (whitespace and case
    ignored; stretches starting every ``step`` characters are tried)."""
    compact = " ".join(text.split()).lower()
    past = [" ".join(str(a).split()).lower() for a in answers]
    return any(compact[i : i + span] in a for i in range(0, max(len(compact) - span + 1, 0), step) for a in past)


def sentences(text: str) -> list[str]:
    """The non-empty sentences of ``text`` (split after ``.``, ``!`` or ``?`` and whitespace)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def clean_feedback(feedback: str, answers: Sequence[str] = (), reference: Iterable[str] = ()) -> str:
    """The user's message without what is no requirement: quotes of the model's own answers (``"..."``
    spans whose text starts one of ``answers``) and the sentences that state a revealed ``reference``
    (a one-line answer, or a whole multi-line solution, which is taken out before the message is split
    into sentences, so that none of its lines survives as a sentence of its own)."""
    flat_answers = [" ".join(str(a).split()) for a in answers if str(a).strip()]

    def unquote(match: re.Match[str]) -> str:
        quoted = " ".join(match.group(1).split()).removesuffix("...").strip()
        return "" if quoted and any(a.startswith(quoted) or quoted in a for a in flat_answers) else match.group(0)

    text = " ".join(re.sub(r"\"([^\"]*)\"\s?", unquote, feedback).split())
    for value in {" ".join(str(v).split()) for v in reference} - {""}:
        text = text.replace(value, _REVEALED)
    kept = [s for s in sentences(text) if _REVEALED not in s
            and not _STATES_ANSWER.search(s) and not s.lower().startswith("here is a correct solution")]
    return " ".join(kept).strip()
