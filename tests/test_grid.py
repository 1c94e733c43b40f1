"""The experiment's grid on Ray (programs/grid.py): cells of mode × task chunk, run as Ray tasks on a local Ray
that the run starts and stops, give the local run's records and the same progress file.

Everything runs for real: a local Ray, workers that build the tiny in-process model from its folder.
"""

from __future__ import annotations

import json
import sys

import psutil
import pytest

from programs import experiment, grid, reporting
from conftest import tiny_experiment_config


def tiny_config(model_dir, **overrides):
    return tiny_experiment_config(model_dir, **{"name": "grid", "limit": 2, "concurrency": 2, **overrides})


def ray_processes():
    """This process's descendants that belong to Ray (its GCS server, raylet, workers)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            text = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if "ray" in text or "gcs_server" in text:
            found.append(text[:120])
    return found


@pytest.fixture
def no_ray_left():
    """The run must stop the local Ray it started; if it did not, stop it here and fail."""
    import ray

    assert not ray.is_initialized()
    yield
    left = ray.is_initialized()
    if left:
        ray.shutdown()
    assert not left, "the run left its local Ray running"
    assert ray_processes() == []


def view(results):
    """Per mode and task, each turn's answer, reward, verdict, feedback and instructions (and ‖Δθ‖ to 4 digits:
    float sums batched differently differ in their last bits)."""
    return {mode: [[(r["turn"], r["outputs"], r["reward"], r["solved"], r["feedback"], r["instructions"],
                     r["refined_instructions"], round(r["delta_norm"], 4)) for r in t] for t in runs]
            for mode, runs in results["trajectories"].items()}


def test_a_two_cell_grid_on_a_local_ray_gives_the_local_runs_records(tiny_model_dir, tmp_path, no_ray_left,
                                                                      one_torch_thread):
    config = tiny_config(tiny_model_dir)
    # Two modes, both tasks in one chunk: two cells, each a Ray task that builds its own actor.
    assert grid.cells([(m, i) for m in config["modes"] for i in range(2)], chunk=8) == [
        [("prompt-only", 0), ("prompt-only", 1)], [("joint", 0), ("joint", 1)]]
    progress = tmp_path / "grid.partial.jsonl"
    on_ray = experiment.run_experiment({**config, "ray": {"address": None, "chunk": 8}}, progress=False,
                                       progress_path=progress)
    local = experiment.run_experiment(config, progress=False)

    assert view(on_ray) == view(local)
    assert any(r["delta_norm"] > 0 for t in on_ray["trajectories"]["joint"] for r in t)  # the weights step ran
    assert on_ray["summaries"]["joint"]["accuracy_per_turn"] == local["summaries"]["joint"]["accuracy_per_turn"]
    assert on_ray["config"]["ray"] == {"address": None, "chunk": 8} and on_ray["resumed"] == 0

    # The driver kept the same progress file a local run keeps: a local rerun resumes all four conversations.
    lines = progress.read_text().splitlines()
    assert sorted((row["mode"], row["task"]) for row in map(json.loads, lines[1:])) == [
        ("joint", 0), ("joint", 1), ("prompt-only", 0), ("prompt-only", 1)]
    resumed = experiment.run_experiment(config, progress=False, progress_path=progress)
    assert resumed["resumed"] == 4 and view(resumed) == view(on_ray)


def test_cells_cut_each_modes_tasks_into_chunks():
    todo = [("joint", 0), ("joint", 1), ("joint", 2), ("oracle", 1), ("static", 0)]
    assert grid.cells(todo, chunk=2) == [[("joint", 0), ("joint", 1)], [("joint", 2)], [("oracle", 1)],
                                         [("static", 0)]]
    assert grid.cells(todo, chunk=1) == [[job] for job in todo]
    with pytest.raises(ValueError, match="at least 1"):
        grid.cells(todo, chunk=0)


def test_the_ray_settings_default_and_unknown_keys_are_refused():
    assert grid.ray_settings({"ray": True}) == {"address": None, "chunk": 8, "num_cpus": 1, "num_gpus": 0}
    assert grid.ray_settings({"ray": {"address": "auto", "chunk": 2}})["chunk"] == 2
    with pytest.raises(ValueError, match="address, chunk, num_cpus, num_gpus"):
        grid.ray_settings({"ray": {"adress": "auto"}})


def test_without_ray_installed_the_run_says_what_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'rosa2-dspy\[ray\]'"):
        experiment.run_experiment({**tiny_config(tiny_model_dir), "ray": {}}, progress=False)


def test_the_command_line_flag_sets_the_address(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(experiment, "run_experiment", lambda config, **kw: seen.append(config["ray"]) or {})
    monkeypatch.setattr(experiment, "report", lambda *a, **k: None)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**tiny_config(tiny_model_dir), "ray": {"chunk": 3}}))
    experiment.main(["--config", str(path), "--ray"])
    experiment.main(["--config", str(path), "--ray", "ray://head:10001"])
    assert seen == [{"chunk": 3, "address": None}, {"chunk": 3, "address": "ray://head:10001"}]


def test_a_failing_cell_raises_its_error_on_the_driver_and_stops_the_local_ray(tiny_model_dir, tmp_path, no_ray_left):
    missing = tmp_path / "no-model-here"
    config = tiny_config(tiny_model_dir, actor={"model": str(missing), "max_tokens": 8}, ray={"chunk": 1})
    progress = tmp_path / "fail.partial.jsonl"
    with pytest.raises(Exception, match="no-model-here") as failure:
        experiment.run_experiment(config, progress=False, progress_path=progress)
    assert "ray" not in type(failure.value).__module__  # the worker's own error, not a wrapper
    assert len(progress.read_text().splitlines()) == 1  # the header only: no conversation finished
