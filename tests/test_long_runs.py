"""Long experiment runs behave: each finished conversation is appended to a progress file, a rerun of the
same config resumes (reads them back, runs only the rest), another config is refused unless started fresh.

Everything runs for real on the tiny in-process model; the only stand-ins are a feedback source that
fails on one task (the "interruption") and a spy that notes which conversations ``ROSA2.interact`` ran.
"""

from __future__ import annotations

import json
import math

import pytest

from programs import experiment, reporting
from programs.progress import ConfigMismatchError
from conftest import tiny_experiment_config as tiny_config
from programs.tasks import feedback_for as real_feedback_for
from rosa2_dspy import ROSA2


class Interrupted(RuntimeError):
    pass


def failing_on(question):
    """``feedback_for`` whose user walks away (raises) on one task: the run stops there."""

    def build(task, **options):
        user = real_feedback_for(task, **options)

        def feedback(example, prediction, trace=None, history=None):
            if example.question == question:
                raise Interrupted("the user left")
            return user(example, prediction, trace, history=history)

        feedback.reference_for = user.reference_for  # the same user: the same accepted answer (Theorem 4.1)
        return feedback

    return build


@pytest.fixture
def ran(monkeypatch):
    """The (mode, question) of every conversation ROSA2.interact runs (it still runs them)."""
    calls: list[tuple[str, str]] = []
    interact = ROSA2.interact

    def spy(self, example, *args, **kwargs):
        calls.append((self.mode, example.question))
        return interact(self, example, *args, **kwargs)

    monkeypatch.setattr(ROSA2, "interact", spy)
    return calls


def comparable(results):
    """Trajectories and summaries without wall-clock fields (and floats to 6 digits: batched sums)."""

    def clean(value, key=""):
        if key in ("times", "seconds", "measure_seconds", "seconds_per_turn", "measurement_seconds_per_turn"):
            return None
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and math.isfinite(value):
            return round(value, 6)
        return value

    return clean({"trajectories": results["trajectories"], "summaries": results["summaries"],
                  "comparisons": results["comparisons"]})


def read_progress(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_an_interrupted_run_resumes_to_the_records_of_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, ran,
                                                                            one_torch_thread):
    config = tiny_config(tiny_model_dir)
    questions = [e.question for e in experiment.load_task("intent", limit=3, spread=True)]
    progress = tmp_path / "resume.partial.jsonl"

    monkeypatch.setattr(experiment, "feedback_for", failing_on(questions[2]))
    with pytest.raises(Interrupted):
        experiment.run_experiment({**config, "concurrency": 2}, progress=False, progress_path=progress)
    header, finished = read_progress(progress)
    kept = {(row["mode"], questions[row["task"]]) for row in finished}
    assert header["config"]["protocol"] == "answer" and len(header["config_hash"]) == 16
    assert 2 <= len(kept) < 6 and all(q != questions[2] for _, q in kept)
    assert all(row["trajectory"][0]["turn"] == 1 for row in finished)

    monkeypatch.setattr(experiment, "feedback_for", real_feedback_for)
    ran.clear()
    resumed = experiment.run_experiment(config, progress=False, progress_path=progress)  # concurrency may change
    all_jobs = {(m, q) for m in config["modes"] for q in questions}
    assert set(ran) == all_jobs - kept and len(ran) == len(set(ran))  # finished conversations were not rerun
    assert resumed["resumed"] == len(kept)
    assert len(read_progress(progress)[1]) == 6  # the rest were appended

    ran.clear()
    uninterrupted = experiment.run_experiment(config, progress=False)
    assert set(ran) == all_jobs and uninterrupted["resumed"] == 0
    assert comparable(resumed) == comparable(uninterrupted)

    ran.clear()  # everything finished: a rerun reads all back and runs nothing (no model is even loaded)
    again = experiment.run_experiment(config, progress=False, progress_path=progress)
    assert ran == [] and again["resumed"] == 6 and comparable(again) == comparable(uninterrupted)


def test_a_different_config_is_refused_unless_fresh(tiny_model_dir, tmp_path, ran):
    config = tiny_config(tiny_model_dir, limit=1, modes=["joint"])
    progress = tmp_path / "p.partial.jsonl"
    experiment.run_experiment(config, progress=False, progress_path=progress)
    assert len(ran) == 1

    for changed in ({"max_turns": 3}, {"protocol": "none", "feedback": {}}, {"limit": 2}):
        with pytest.raises(ConfigMismatchError, match="--fresh"):
            experiment.run_experiment({**config, **changed}, progress=False, progress_path=progress)
    assert len(ran) == 1 and len(read_progress(progress)[1]) == 1  # nothing ran, nothing was mixed in

    fresh = experiment.run_experiment({**config, "max_turns": 3}, progress=False, progress_path=progress, fresh=True)
    assert len(ran) == 2 and fresh["resumed"] == 0
    header, rows = read_progress(progress)
    assert header["config"]["max_turns"] == 3 and len(rows) == 1


def test_a_line_cut_short_by_a_kill_is_dropped_and_that_conversation_runs_again(tiny_model_dir, tmp_path, ran):
    config = tiny_config(tiny_model_dir, limit=2, modes=["prompt-only"])
    progress = tmp_path / "cut.partial.jsonl"
    experiment.run_experiment(config, progress=False, progress_path=progress)
    text = progress.read_text()
    progress.write_text(text[: len(text) - 40])  # the last conversation's line, half written
    ran.clear()
    experiment.run_experiment(config, progress=False, progress_path=progress)
    assert len(ran) == 1 and len(read_progress(progress)[1]) == 2


def test_the_command_line_resumes_refuses_and_names_the_protocol(tiny_model_dir, tmp_path, monkeypatch, capsys, ran):
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path / "results")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config(tiny_model_dir, name="tiny", limit=2, modes=["static", "joint"])))
    progress = tmp_path / "results" / "tiny.partial.jsonl"
    questions = [e.question for e in experiment.load_task("intent", limit=2, spread=True)]

    monkeypatch.setattr(experiment, "feedback_for", failing_on(questions[1]))
    with pytest.raises(Interrupted):
        experiment.main(["--config", str(path), "--protocol", "none"])
    assert progress.is_file() and not (tmp_path / "results" / "tiny.json").exists()
    with pytest.raises(SystemExit, match="--fresh"):  # another protocol is another config
        experiment.main(["--config", str(path), "--protocol", "hint"])

    monkeypatch.setattr(experiment, "feedback_for", real_feedback_for)
    done_before = len(read_progress(progress)[1])
    ran.clear()
    experiment.main(["--config", str(path), "--protocol", "none"])
    assert len(ran) == 4 - done_before
    out = capsys.readouterr().out
    assert "protocol none" in out and "Paired comparisons" in out and "McNemar" in out
    written = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert written["protocol"] == "none" and written["config"]["protocol"] == "none"
    assert "protocol none" in written["title"] and written["resumed"] == done_before
    assert not progress.exists()  # the results file now holds everything


def test_an_interrupted_run_covers_every_mode_of_its_first_tasks_and_can_be_analysed_as_it_stands(
        tiny_model_dir, tmp_path, monkeypatch, ran, one_torch_thread):
    config = tiny_config(tiny_model_dir)
    questions = [e.question for e in experiment.load_task("intent", limit=3, spread=True)]
    progress = tmp_path / "partial.partial.jsonl"
    monkeypatch.setattr(experiment, "feedback_for", failing_on(questions[2]))
    with pytest.raises(Interrupted):
        experiment.run_experiment(config, progress=False, progress_path=progress)  # one conversation at a time
    asked = [q for _, q in ran]
    assert asked[:4] == [questions[0]] * 2 + [questions[1]] * 2 and set(asked[4:]) == {questions[2]}  # task by task
    ran.clear()
    partial = experiment.run_experiment(config, progress=False, progress_path=progress, finished_only=True)
    assert ran == []  # nothing runs
    assert partial["partial"] == {"tasks_complete": 2, "tasks": 3, "task_indices": [0, 1],
                                  "conversations_finished": 4, "conversations": 6}
    assert all(len(partial["trajectories"][mode]) == 2 for mode in config["modes"])
    assert all(s["tasks"] == 2 for s in partial["summaries"].values())
    assert len(read_progress(progress)[1]) == 4  # kept for the resume
    with pytest.raises(SystemExit, match="No task has finished"):
        experiment.run_experiment(config, progress=False, progress_path=tmp_path / "none.partial.jsonl",
                                  finished_only=True)
