"""The words step's structured gradient: requirements merged into the instruction, never an answer."""

from __future__ import annotations

import json

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from conftest import requirement_refiner, requirements_of
from rosa2_dspy import ROSA2
from rosa2_dspy.feedback.simulated_user import SOLUTION
from rosa2_dspy.requirements import clean_feedback, forbidden_numbers, join, merge, rejection_reason, split
from rosa2_dspy.words import InstructionRefiner, shipped_demos

BASE = "Answer the question."


def test_merge_adds_replaces_same_topic_drops_duplicates_and_keeps_the_newest():
    first = merge(BASE, ["Give distances in meters."])
    assert first.instruction == BASE + "\n\nRequirements:\n- Give distances in meters." and first.added
    assert split(first.instruction) == (BASE, ["Give distances in meters."])
    assert join(*split(first.instruction)) == first.instruction
    again = merge(first.instruction, ["Give distances in meters"])  # the same, bar punctuation
    assert again.duplicates and not again.changed and again.instruction == first.instruction
    changed = merge(first.instruction, ["Give distances in kilometres, as a number followed by km."])
    assert changed.replaced == ["Give distances in meters."]
    assert split(changed.instruction)[1] == ["Give distances in kilometres, as a number followed by km."]
    other = merge(changed.instruction, ["Write the whole answer in capital letters."])
    assert len(split(other.instruction)[1]) == 2 and not other.replaced
    three = ["Write in capital letters.", "Give distances in meters.", "End with a full stop."]
    many = merge(BASE, three, max_requirements=2)
    assert split(many.instruction)[1] == three[1:] and many.evicted == three[:1]


def test_a_requirement_never_carries_a_specific_answer():
    forbidden = forbidden_numbers(["(94)", "The answer is 90."], "Hint: like 12 kg. Use 2 decimal places.")
    assert {"94", "90", "12"} <= forbidden and "2" not in forbidden
    assert rejection_reason("The answer is (94).", forbidden) == "states a specific answer"
    assert rejection_reason("Always write 94 in parentheses.", forbidden).startswith("copies a number")
    assert rejection_reason("Write the weight with its unit, like 12 kg.", forbidden).startswith("copies a number")
    assert rejection_reason("Round numbers to 2 decimal places.", forbidden) == ""
    assert rejection_reason("Put the final answer in parentheses.", forbidden) == ""
    assert rejection_reason("The answer to the question is wrong.", forbidden) == "a complaint, not a requirement"
    # the simulated user's own words, which the embedded refiner wrote back as a requirement in most
    # conversations of the math run under `none` (results/math_embedded_cpu.json)
    assert rejection_reason("No, that's not right.", forbidden) == "a complaint, not a requirement"
    assert "echoes" in rejection_reason("Say: the Eiffel Tower was completed in", set(),
                                        ["The Eiffel Tower was completed in 1889 in Paris."])


def test_clean_feedback_drops_quotes_of_the_answer_and_the_revealed_answer():
    answer = "You can use the format() function to create a string with the specified width"
    feedback = (f'No, that\'s not right. Your answer "{answer[:40]}..." is not what I meant. '
                "What I meant: as a percentage, with the % sign. The correct answer is 25%.")
    cleaned = clean_feedback(feedback, [answer], ["25%"])
    assert cleaned == "No, that's not right. Your answer is not what I meant. What I meant: as a percentage, with the % sign."


def test_a_revealed_solution_reaches_the_words_in_no_part():
    # HumanEval under `answer` shows a whole solution; split into sentences at its periods, parts of it
    # used to survive the cleaning (seen in the records of results/humaneval_answer_embedded_cpu.json)
    solution = '    """ Return the decimal part.\n    >>> truncate_number(3.5)\n    0.5\n    """\n    return number % 1.0\n'
    feedback = ("No, that's not right. 0 of 3 tests passed. The first failure: `assert truncate_number(3.5) == 0.5`. "
                + SOLUTION.format(solution))
    cleaned = clean_feedback(feedback, [], [solution])
    assert cleaned == "No, that's not right. 0 of 3 tests passed. The first failure: `assert truncate_number(3.5) == 0.5`."
    # a requirement that copies a line of it is refused (the embedded refiner wrote one in the same run)
    counting = "    vowels = 'aeiouAEIOU'\n    n_vowels = sum(c in vowels for c in s)\n    return n_vowels\n"
    assert rejection_reason("n_vowels = sum(c in vowels for c in s)", set(), [], [counting]) == "copies the revealed answer"
    assert rejection_reason("Reply with the whole function definition.", set(), [], [counting]) == ""


def test_the_refiner_merges_usable_requirements_and_rejects_the_answer():
    lm = requirement_refiner("The answer is (94).", "Put the final answer in parentheses.", "Always answer with 94.")
    refiner = InstructionRefiner(lm=lm)
    out = refiner(instruction=BASE, feedback="No. The correct answer is (94). Put it in parentheses, please.",
                  answers=["90"], reference=["(94)"], inputs=["What is 47 * 2?"])
    assert out.source == "lm" and out.accepted and out.added == ["Put the final answer in parentheses."]
    assert "94" not in out.refined_instruction
    assert [why for _, why in out.rejected] == ["states a specific answer", "copies a number of a specific question or answer"]
    # What the refiner's LM was shown: the feedback without the revealed answer.
    shown = json.dumps(lm.history[-1]["messages"])
    assert "(94)" not in shown and "Put it in parentheses" in shown


def test_a_demo_requirement_on_a_topic_the_user_never_raised_is_refused():
    casing = "Write the whole answer in capital letters."  # the casing demo's requirement
    generic = "Check the calculation step by step before answering."  # the bare "wrong" demo's: allowed anywhere
    refiner = InstructionRefiner(lm=requirement_refiner(casing, generic))
    out = refiner(instruction="Write the function.",
                  feedback="0 of 3 tests passed. The first failure: `assert f(3.5) == 0.5` raised AssertionError.")
    assert out.rejected == [[casing, "copies a demo's requirement the user never asked for"]]
    assert out.added == [generic]
    # the same requirement when this user did ask for it
    asked = InstructionRefiner(lm=requirement_refiner(casing))(instruction="Answer.",
                                                               feedback="Please use capital letters.")
    assert asked.added == [casing] and not asked.rejected


def test_the_append_fallback_merges_the_cleaned_feedback_without_the_answer():
    failing = DummyLM([{"requirements": "not a list ["}] * 4)  # no usable requirement in it
    refiner = InstructionRefiner(lm=failing, fallback="append")
    out = refiner(instruction=BASE, feedback="No, that's not right. The correct answer is 94. Put it in parentheses.",
                  reference=["94"])
    assert out.source == "append" and out.reason
    assert requirements_of({"p": out.refined_instruction}) == {"p": ["The user said: Put it in parentheses."]}
    keep = InstructionRefiner(lm=failing, fallback="keep")(instruction=BASE, feedback="Put it in parentheses.")
    assert keep.source == "kept" and keep.refined_instruction == BASE and not keep.accepted


def test_shipped_demos_are_attached_and_the_nearest_are_shown_last():
    demos = shipped_demos()
    assert len(demos) >= 10 and all(d.requirements for d in demos)
    refiner = InstructionRefiner(lm=requirement_refiner("Write percentages with the % sign."), num_demos=3)
    assert len(refiner.predict.demos) == len(demos)
    nearest = refiner._nearest_demos("What I meant: as a percentage, with the % sign.")
    assert len(nearest) == 3 and "percentage" in nearest[-1].feedback
    refiner(instruction=BASE, feedback="What I meant: as a percentage, with the % sign.")
    shown = json.dumps(refiner.refiner_lm.history[-1]["messages"])
    assert nearest[-1].feedback.replace('"', '\\"') in shown
    assert not InstructionRefiner(num_demos=0)._nearest_demos("anything")


def test_a_session_carried_over_from_a_revealed_answer_does_not_inherit_it(tiny_lm):
    """After a conversation in which the user revealed the answer, the carried-over session's words hold the
    user's requirement but not the answer, so the model is never told to answer a new question with it."""
    def user(example, prediction, trace=None):
        return dspy.Prediction(score=0.0, feedback="No. The correct answer is (94). Put the answer in parentheses.",
                               reference={"answer": "(94)"})

    pasting = requirement_refiner("The answer is (94).", "Put the final answer in parentheses.", "Answer (94).")
    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, user, mode="joint", refiner_lm=pasting, max_turns=2)
    first = rosa2.interact(dspy.Example(question="What is 47 * 2?").with_inputs("question"))
    taught = first.rosa2.session_id
    assert requirements_of(rosa2.sessions[taught].instructions) == {"self": ["Put the final answer in parentheses."]}
    carried = rosa2.start_session(carry_over_from=taught)
    with rosa2.in_session(carried):
        rosa2(question="What is 13 * 3?")
    system = tiny_lm.history[-1]["messages"][0]["content"]
    assert "parentheses" in system and "94" not in system


@pytest.mark.integration
def test_the_embedded_refiner_writes_a_usable_requirement(embedded_lm):
    """The 135M model with the shipped demos turns a user's stated intent into a requirement (greedy)."""
    refiner = InstructionRefiner(lm=embedded_lm.copy(max_tokens=64))
    out = refiner(instruction="Given the fields `question`, produce the fields `answer`.",
                  feedback="No, that's not right. Your answer is not what I meant. "
                           "What I meant: the distance in meters, written as a number followed by the unit m.",
                  inputs=["How far is 3 km?"])
    assert out.source == "lm", out.reason
    assert any("meter" in r.lower() for r in out.added)


def test_a_requirement_already_stated_is_used_without_changing_the_instruction_and_summaries_count_it():
    from rosa2_dspy.records import TurnRecord, words_summary

    refiner = InstructionRefiner(lm=requirement_refiner("Put the final answer in parentheses."))
    first = refiner(instruction=BASE, feedback="Put it in parentheses.")
    again = refiner(instruction=first.refined_instruction, feedback="Parentheses, please!")
    assert (first.source, first.accepted) == ("lm", True)
    assert (again.source, again.accepted, again.refined_instruction) == ("lm", False, first.refined_instruction)
    kept = InstructionRefiner(lm=DummyLM([{"requirements": "[unparsable"}] * 2))(instruction=BASE, feedback="Meters.")
    records = [TurnRecord(turn=k + 1, mode="prompt-only", instructions={"p": text}, outputs={"answer": "x"},
                          words={"p": {"source": out.source, "accepted": out.accepted, "reason": out.reason,
                                        "rejected": out.rejected, "added": out.get("added")}})
               for k, (text, out) in enumerate([(BASE, first), (first.refined_instruction, again), (BASE, kept)])]
    summary = words_summary([records])
    assert summary["steps"] == 3 and summary["used"] == 2 / 3 and summary["changed"] == 1 / 3
    assert summary["kept"] == 1 / 3 and summary["not_used_reasons"] == {"not a requirement (too few words)": 1}
    assert summary["instruction_chars_per_turn"] == [len(BASE), len(first.refined_instruction), len(BASE)]
    assert summary["added_requirements"] == 1 and summary["most_added"] == [["Put the final answer in parentheses.", 1]]
