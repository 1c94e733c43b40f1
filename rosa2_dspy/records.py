"""Per-turn records (spec: "Per-turn records a run must keep") and the metrics derived from them."""

from __future__ import annotations

import statistics
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy

from rosa2_dspy.stats import bootstrap_ci, solved_by

PHASES = ("generate", "feedback", "words", "weights")
# Timed apart from PHASES: measurements that are not adaptation (ROSA2's compare_words and
# measure_theorem41, the weights step's measure_after).
MEASUREMENTS = ("compare_words", "theorem41", "measure_after")


@dataclass
class TurnRecord:
    """One turn: what ran, what the user said, and what the words and weights steps did."""

    turn: int
    mode: str
    instructions: dict[str, str]
    outputs: dict[str, Any]
    reward: float | None = None
    solved: bool | None = None
    feedback: str = ""
    refined_instructions: dict[str, str] | None = None
    words: dict[str, dict[str, Any]] = field(default_factory=dict)  # predictor -> accepted/reason/diagnosis
    weights: dict[str, Any] | None = None  # WeightStep.summary()
    delta_norm: float = 0.0
    delta_norm_original_words: float | None = None  # step-norm comparison: ROSA's step under the old words
    theorem41: dict[str, Any] | None = None  # Theorem 4.1's minimal shifts (rosa2_dspy.theorem41.measure)
    # seconds per phase (PHASES) and, under their own keys, per measurement that is not adaptation (MEASUREMENTS)
    times: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "completion": 0})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnRecord:
        """The record :meth:`to_dict` gave (e.g. read back from JSON); unknown keys are an error."""
        return cls(**data)


@dataclass
class InteractionResult:
    """What one :meth:`ROSA2.interact` did: the per-turn records, whether it was solved, in how many turns."""

    trajectory: list[TurnRecord]
    solved: bool
    turns: int
    session_id: str


class InteractionPrediction(dspy.Prediction):
    """The last answer of an interaction: the wrapped program's own fields, untouched (ReAct's ``trajectory``
    included), plus ROSA2's data under the one reserved attribute ``rosa2`` (an :class:`InteractionResult`).

    ``rosa2`` is an attribute, not a field: ``items()``, ``keys()`` and ``toDict()`` hold the program's
    fields only, so a metric or ``dspy.Evaluate`` sees exactly what the program answered.
    """

    rosa2: InteractionResult | None = None  # a class attribute: DSPy then stores it as an attribute, not a field


def degenerate(text: str) -> str:
    """Why ``text`` looks like a wrecked model's output ("" if it does not). A simple, documented detector:

    * **non-text characters**: the replacement character U+FFFD (broken byte sequences), control
      characters other than newline/tab, unassigned or private-use code points, or combining marks
      making up more than 10% of the characters;
    * **repetition**: 12 words or more, of which fewer than half of the word 3-grams are distinct.

    It flags babble such as ``"� Shantְ,\n� Shantְ,\n..."``; a fluent wrong answer is not degenerate.
    """
    if not text:
        return ""
    categories = [unicodedata.category(c) for c in text]
    if "\ufffd" in text or any(k in ("Cn", "Co") or (k == "Cc" and c not in "\n\t\r")
                                 for c, k in zip(text, categories)):
        return "non-text characters"
    if sum(k.startswith("M") for k in categories) > 0.1 * len(text):
        return "non-text characters"
    words = text.lower().split()
    if len(words) >= 12:
        trigrams = list(zip(words, words[1:], words[2:]))
        if len(set(trigrams)) < 0.5 * len(trigrams):
            return "repetition"
    return ""


def degenerate_answer(record: TurnRecord) -> bool:
    """Whether any output of ``record`` is :func:`degenerate` (babble, not a fluent wrong answer)."""
    return any(isinstance(v, str) and degenerate(v) for v in record.outputs.values())


def first_solved(trajectory: Sequence[TurnRecord]) -> int | None:
    """The turn at which ``trajectory`` was first solved (None: never)."""
    return next((r.turn for r in trajectory if r.solved), None)


def reward_at(trajectory: Sequence[TurnRecord], k: int) -> float | None:
    """The reward at turn ``k`` (1-based); a conversation that ended earlier keeps its last reward."""
    return trajectory[min(k, len(trajectory)) - 1].reward


def words_summary(trajectories: Sequence[Sequence[TurnRecord]]) -> dict[str, Any]:
    """What the words steps did (issue: "measure it"): over every predictor's words step, the share whose
    refiner output was used (``used``: source ``lm``, merged into the instruction; ``changed``: of all steps,
    those whose instruction changed at all, from any source), that fell back to appending the feedback
    (``appended``) or kept the instruction (``kept``), the reasons the refiner's output was not
    used (counts), requirements rejected by reason, how many requirements were added and the five added
    most often (``most_added``: ``[requirement, count]``; one requirement written into many conversations'
    instructions is the refiner repeating itself or its demos), and the instruction's length (characters,
    all predictors) at the start of each turn, averaged over interactions that reached that turn."""
    steps = [w for t in trajectories for r in t for w in r.words.values()]
    n = len(steps)
    reasons: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for w in steps:
        if w.get("source") != "lm" and w.get("reason"):
            key = w["reason"].split(":")[0] if w["reason"].startswith("refiner error") else w["reason"]
            reasons[key] = reasons.get(key, 0) + 1
        for _, why in w.get("rejected") or []:
            rejected[why] = rejected.get(why, 0) + 1
    added = Counter(" ".join(str(a).split()) for w in steps for a in w.get("added") or [])
    lengths: dict[int, list[int]] = {}
    for t in trajectories:
        for r in t:
            lengths.setdefault(r.turn, []).append(sum(len(v) for v in r.instructions.values()))
    return {
        "steps": n,
        "used": sum(w.get("source") == "lm" for w in steps) / n if n else None,
        "changed": sum(bool(w.get("accepted")) for w in steps) / n if n else None,
        "appended": sum(w.get("source") == "append" for w in steps) / n if n else None,
        "kept": sum(w.get("source") == "kept" for w in steps) / n if n else None,
        "not_used_reasons": reasons,
        "rejected_requirements": rejected,
        "added_requirements": sum(added.values()),
        "most_added": [[text, count] for text, count in added.most_common(5)],
        "instruction_chars_per_turn": [statistics.mean(lengths[k]) for k in sorted(lengths)],
    }


def parse_rate(trajectories: Sequence[Sequence[TurnRecord]]) -> float | None:
    """Share of turns whose every output field (but ChainOfThought's ``reasoning``) was found (:func:`~rosa2_dspy.adapter.answer_parsed`: non-empty,
    not DSPy's field markers; an echo of the question is not checked here, the records do not keep it)."""
    from rosa2_dspy.adapter import answer_parsed

    turns = [r for t in trajectories for r in t]
    found = [all(answer_parsed(v, {}) for k, v in r.outputs.items() if k != "reasoning") for r in turns]
    return sum(found) / len(found) if found else None


def summarize(trajectories: Sequence[Sequence[TurnRecord]], max_turns: int) -> dict[str, Any]:
    """Aggregate interactions (one trajectory per task) into the spec's metrics.

    * ``accuracy_per_turn[k]``: share of tasks solved by turn k+1 (an interaction stops once solved,
      so a solved task counts as solved at every later turn);
    * ``turns_to_solve``: mean turns over the solved tasks, and ``mean_turns`` over all (unsolved = max);
    * ``correction_uplift``: share of first-turn failures solved later;
    * ``reward_per_turn[k]``: mean reward at turn k+1 (a finished interaction keeps its last reward), the
      partial credit a task gives (e.g. the intent format right but the value wrong);
    * mean ``‖Δθ‖`` over turns with an applied weights step, mean seconds per phase per turn, and apart
      from them, per measurement that is not adaptation (``measurement_seconds_per_turn``);
    * ``degenerate_final``: share of interactions whose last answer is :func:`degenerate`;
    * ``parse_rate`` (:func:`parse_rate`) and ``words`` (:func:`words_summary`);
    * ``solved_at``: per task, the turn it was first solved at (None: never), for paired comparisons
      (:func:`rosa2_dspy.stats.compare_modes`);
    * 95% bootstrap intervals over tasks (:mod:`rosa2_dspy.stats`, seeded): ``accuracy_per_turn_ci``
      (one ``[low, high]`` per turn), ``final_accuracy_ci``, ``turns_to_solve_ci`` (over the solved
      tasks), ``mean_turns_ci`` and ``correction_uplift_ci`` (over the first-turn failures); ``None``
      where fewer than two tasks enter the statistic.
    """
    n = len(trajectories)
    solved_at = [first_solved(t) for t in trajectories]
    accuracy = [sum(1 for s in solved_at if s is not None and s <= k) / n for k in range(1, max_turns + 1)] if n else []
    first_failures = [s for s, t in zip(solved_at, trajectories) if t and not t[0].solved]
    turns = [r for t in trajectories for r in t]
    norms = [r.delta_norm for r in turns if r.weights and r.weights.get("applied")]
    solved_turns = [s for s in solved_at if s is not None]
    all_turns = [s if s is not None else max_turns for s in solved_at]
    accuracy_ci = [bootstrap_ci(solved_by(solved_at, k)) for k in range(1, max_turns + 1)] if n else []
    corrected = [int(s is not None) for s in first_failures]
    # The reward at each turn (a finished conversation keeps its last one): partial credit where a task
    # gives it (e.g. generated intent tasks: format and value, half each), which acc@k cannot show.
    rewards = [[float(r) for t in trajectories if t and (r := reward_at(t, k)) is not None]
               for k in range(1, max_turns + 1)]
    return {
        "tasks": n,
        "accuracy_per_turn": accuracy,
        "accuracy_per_turn_ci": accuracy_ci,
        "final_accuracy": accuracy[-1] if accuracy else 0.0,
        "final_accuracy_ci": accuracy_ci[-1] if accuracy_ci else None,
        "turns_to_solve": statistics.mean(solved_turns) if solved_turns else None,
        "turns_to_solve_ci": bootstrap_ci(solved_turns),
        "mean_turns": statistics.mean(all_turns) if n else None,
        "mean_turns_ci": bootstrap_ci(all_turns),
        "correction_uplift": sum(corrected) / len(corrected) if corrected else 0.0,
        "correction_uplift_ci": bootstrap_ci(corrected),
        "reward_per_turn": [statistics.mean(r) if r else None for r in rewards],
        "reward_per_turn_ci": [bootstrap_ci(r) for r in rewards],
        "solved_at": solved_at,
        "mean_delta_norm": statistics.mean(norms) if norms else 0.0,
        "seconds_per_turn": {p: statistics.mean(r.times[p] for r in turns) if turns else 0.0 for p in PHASES},
        "measurement_seconds_per_turn": {m: statistics.mean(r.times.get(m, 0.0) for r in turns) if turns else 0.0
                                         for m in MEASUREMENTS},
        "parse_rate": parse_rate(trajectories),
        "words": words_summary(trajectories),
        "degenerate_final": sum(1 for t in trajectories if t and degenerate_answer(t[-1])) / n if n else 0.0,
        "tokens_per_task": statistics.mean(sum(r.tokens["prompt"] + r.tokens["completion"] for r in t)
                                           for t in trajectories) if n else 0.0,
    }
