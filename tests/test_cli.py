"""The interactive chat loop, driven by a script of lines as a person would type them."""

from __future__ import annotations

import dspy
import torch
from dspy.utils.dummies import DummyLM

from rosa2_dspy.cli import main, run_chat
from rosa2_dspy.rosa2 import ROSA2


def test_chat_shows_words_and_weights_changing_turn_by_turn(tiny_lm, tmp_path):
    refiner = DummyLM([{"diagnosis": "wants a number", "refined_instruction": "Reply with the number only."}] * 5)
    rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, mode="joint", refiner_lm=refiner)
    lines = iter(["What is 2+3?", "/answer 5", "", "no, just the number", "/score x bad", "/score 0.5 closer",
                  "/ok", f"/save {tmp_path / 's'}", "/load /nonexistent", "/quit"])
    shown: list[str] = []
    run_chat(rosa2, read=lambda prompt: next(lines), write=shown.append)
    text = "\n".join(shown)
    assert "[turn 1] answer:" in text and "[turn 2] answer:" in text and "[turn 3] answer:" in text
    assert "[words] predict: refined: Reply with the number only." in text
    assert "[weights] applied: |Δθ| =" in text
    assert "usage: /score X TEXT" in text and "accepted." in text
    assert "error:" in text  # /load of a missing folder is reported, not raised
    assert [r.reward for r in rosa2.session.history] == [0.0, 0.5, 1.0]
    assert not torch.equal(rosa2.session.adapter, tiny_lm.policy.initial_adapter_vector)
    assert (tmp_path / "s" / "state.json").is_file()


def test_rosa2_chat_command_loads_a_model_by_path_and_appends_feedback_when_the_local_refiner_fails(tiny_model_dir):
    lines = iter(["What is 2+3?", "no, just the number", "/quit"])
    shown: list[str] = []
    main(["--model", str(tiny_model_dir), "--program", "predict", "--max-tokens", "8"],
         read=lambda prompt: next(lines), write=shown.append)
    text = "\n".join(shown)
    assert "ROSA2 chat, mode=joint" in text and "[turn 2] answer:" in text
    # The tiny local refiner writes junk; the default fallback for a local refiner turns the feedback into a requirement.
    assert "[words] self: refined: Given the fields `question`, produce the fields `answer`." in text
    assert "Requirement from the user: no, just the number" in text
    assert "[weights] applied: |Δθ| =" in text
