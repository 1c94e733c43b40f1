"""The interactive chat loop, driven by a script of lines as a person would type them."""

from __future__ import annotations

import dspy
import torch

from conftest import make_scripted_policy, requirement_refiner
from rosa2_dspy.cli import main, run_chat
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.rosa2 import ROSA2


def test_chat_shows_words_and_weights_changing_turn_by_turn(tiny_lm, tmp_path):
    refiner = requirement_refiner("Reply with the number only.", n=5)
    rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, mode="joint", refiner_lm=refiner)
    lines = iter(["What is 2+3?", "/answer 5", "", "no, just the number", "/score x bad", "/score 0.5 closer",
                  "/ok", f"/save {tmp_path / 's'}", "/load /nonexistent", "/quit"])
    shown: list[str] = []
    run_chat(rosa2, read=lambda prompt: next(lines), write=shown.append)
    text = "\n".join(shown)
    assert "[turn 1] answer:" in text and "[turn 2] answer:" in text and "[turn 3] answer:" in text
    assert "[words] predict: refined:" in text and "- Reply with the number only." in text
    assert "[weights] applied: |Δθ| =" in text
    assert "usage: /score X TEXT" in text and "accepted." in text
    assert "error:" in text  # /load of a missing folder is reported, not raised
    assert [r.reward for r in rosa2.session.history] == [0.0, 0.5, 1.0]
    assert not torch.equal(rosa2.session.adapter, tiny_lm.policy.initial_adapter_vector)
    assert (tmp_path / "s" / "state.json").is_file()


def test_rosa2_chat_command_loads_a_model_by_path_and_appends_feedback_when_the_local_refiner_fails(tiny_model_dir):
    lines = iter(["What is 2+3?", "no, just the number", "/answer 5", "no, it is 5", "/quit"])
    shown: list[str] = []
    main(["--model", str(tiny_model_dir), "--program", "predict", "--max-tokens", "8"],
         read=lambda prompt: next(lines), write=shown.append)
    text = "\n".join(shown)
    assert "ROSA2 chat, mode=joint" in text and "[turn 2] answer:" in text
    # The tiny local refiner writes junk; the default fallback for a local refiner turns the feedback into a requirement.
    assert "[words] self: refined: Given the fields `question`, produce the fields `answer`." in text
    assert "- The user said: no, just the number" in text
    # A plain "no" gives the weights step nothing to contrast (the default prior baseline 0): no step.
    assert "[weights] skipped (no reward contrast: every target is 0): |Δθ| = 0" in text
    assert "[weights] applied: |Δθ| =" in text  # the revealed answer gives it a reference to move toward


def _chat(rosa2, lines, **kwargs):
    lines = iter(lines)
    shown: list[str] = []
    run_chat(rosa2, read=lambda prompt: next(lines), write=shown.append, **kwargs)
    return shown


def test_chat_reports_every_bad_input_and_goes_on(tiny_lm, tmp_path):
    refiner = requirement_refiner("Reply with the number only.", n=20)
    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, mode="joint", refiner_lm=refiner)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "state.json").write_text("{not json")
    shown = _chat(rosa2, [
        "/ok", "/score 1 fine", "/answer 5", "/frobnicate",                 # commands that need an answer, unknown
        "What is 2+3?", "/score", "/score 2 too much", "/score nan x", "/answer",  # bad arguments
        f"/save {a_file / 'state'}",                                          # unwritable: under a file
        f"/load {malformed}", f"/load {tmp_path / 'missing'}",                # malformed, missing
        f"/save {tmp_path / 'good'}", f"/load {tmp_path / 'good'}",           # a load with a question pending
        "no, just the number",                                                # ... so this is a new question
        "wrong", "/quit"])
    text = "\n".join(shown)
    assert text.count("ask a question first") == 3 and "unknown command /frobnicate" in text
    assert text.count("usage: /score X TEXT") == 3 and "usage: /answer TEXT" in text
    assert text.count("error:") == 3  # the unwritable save, the malformed and the missing load
    assert f"saved to {tmp_path / 'good'}" in text and "loaded; ask a question." in text
    assert [r.reward for r in rosa2.session.history] == [0.0]  # "wrong" was feedback on "no, just the number"
    assert rosa2.session.turns[0].inputs == {"question": "no, just the number"}
    assert shown[-1].startswith("[turn 2] answer:")


def test_the_revealed_answer_belongs_to_its_question_only(tiny_lm, monkeypatch):
    refiner = requirement_refiner("Reply with the number only.", n=20)
    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, mode="param-only", refiner_lm=refiner)
    references = []
    adapt = rosa2.adapt

    def spy(feedback, score=None, reference=None):
        references.append(reference)
        return adapt(feedback, score=score, reference=reference)

    monkeypatch.setattr(rosa2, "adapt", spy)
    _chat(rosa2, [
        "What is 2+3?", "/answer 5", "no", "/score 0.5 closer", "/ok",      # kept for the whole question
        "Name a red fruit.", "wrong",                                        # /ok ended it
        "/answer apple", "/new", "Spell cat.", "wrong",                      # /new ended it
        "/answer tac", "/load /nonexistent", "still wrong",                  # a failed /load keeps the question
        "/quit"])
    assert references == [{"answer": "5"}, {"answer": "5"}, None, None, None, {"answer": "tac"}]


def test_chat_prints_the_answer_as_it_is_generated(scripted_lm):
    rosa2 = ROSA2(dspy.Predict("question -> answer"), scripted_lm, mode="param-only")
    tokens: list[str] = []
    shown = _chat(rosa2, ["What is 2+3?", "no", "/quit"], write_token=tokens.append)
    assert tokens[0] == "[turn 1] answer: It" and tokens[1:4] == [" is", " five", "."] and tokens[4] == "\n"
    assert "".join(tokens).count("[turn 2] answer: It is five.\n") == 1
    assert not any("answer:" in line for line in shown)  # streamed, not printed again
    # Without a write_token (or with --no-stream) the answer comes whole.
    assert _chat(rosa2, ["/new", "What is 2+3?", "/quit"])[-1] == "[turn 1] answer: It is five."


def test_chat_prints_the_whole_answer_when_nothing_could_be_streamed(tiny_lm):
    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, mode="param-only")
    tokens: list[str] = []
    shown = _chat(rosa2, ["What is 2+3?", "/quit"], write_token=tokens.append)
    assert tokens == [] and shown[-1].startswith("[turn 1] answer:")


def test_chat_streams_a_plain_answer_of_a_model_that_writes_no_sections():
    lm = LocalLM(make_scripted_policy(["Paris", " is", " the", " capital", "."]), max_tokens=24)
    rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), lm, mode="param-only")
    tokens: list[str] = []
    shown = _chat(rosa2, ["Capital of France?", "/quit"], write_token=tokens.append)
    assert tokens == ["[turn 1] answer: Paris", " is", " the", " capital", ".", "\n"]
    assert not any("answer:" in line for line in shown)
