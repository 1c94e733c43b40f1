"""ROSA as an online/offline weights optimizer for any DSPy program on a local model.

:meth:`WeightOptimizer.compile <rosa2_dspy.weights.WeightOptimizer.compile>` (so ``ROSAStep``, and the
``IterativeTTT`` / ``NoUpdate`` baselines) takes DSPy's teleprompter contract::

    optimizer = ROSAStep(beta=0.5, max_norm=1.0)
    student = optimizer.compile(program, trainset=trainset, metric=metric, batch_size=4)

For each example of ``trainset`` (``dspy.Example`` with inputs marked) the student runs on its
:class:`~rosa2_dspy.local_lm.LocalLM` (the one its predictors carry, else ``lm=``, else the LM configured in
DSPy); every LM call's *raw completion* (what the model really wrote, with the exact chat prompt it
answered) becomes a response scored by the metric (DSPy arities ``(example, pred)`` and
``(example, pred, trace)``; a float, a bool, or a ``dspy.Prediction(score=..., feedback=..., reference=...)``).
Preferred answers join as ``reference`` responses: the example's labels, written the way the model writes
and scored by the same metric (``use_labels``), and any ``reference`` the metric reveals (reward 1). Every
``batch_size`` examples, one weights step (:meth:`~rosa2_dspy.weights.WeightOptimizer.step`) turns the
batch's responses into advantages and moves the adapter: per example (``batch_size=1``, online) or in
mini-batches (offline), for ``epochs`` passes.

The adapter is the LocalLM's own (``lm.policy``): the step changes the model every program on that LocalLM
uses, so ``compile`` returns the student itself (DSPy teleprompters return a program; here the learned
part lives in the model). ``optimizer.rollback(lm.policy)`` undoes the last step,
``lm.policy.save_adapter(folder)`` saves the result, ``optimizer.history`` records each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dspy
from dspy.adapters.chat_adapter import field_header_pattern

from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.feedback import call_feedback
from rosa2_dspy.local_lm import LocalLM, lm_scope

if TYPE_CHECKING:
    from rosa2_dspy.weights import ScoredResponse, WeightOptimizer

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One run of the student on one example: its prediction, the metric's verdict, the responses."""

    example: dspy.Example
    prediction: dspy.Prediction | None
    score: float
    feedback: str = ""
    error: str = ""
    responses: list["ScoredResponse"] = field(default_factory=list)


def local_lm_of(student: dspy.Module, lm: dspy.BaseLM | None = None) -> LocalLM:
    """The LocalLM a program runs on: ``lm``, else its predictors' LM, else DSPy's configured LM."""
    candidates = [lm] if lm is not None else []
    candidates += [p.lm for _, p in student.named_predictors() if getattr(p, "lm", None) is not None]
    candidates.append(dspy.settings.lm)
    chosen = next((c for c in candidates if c is not None), None)
    if not isinstance(chosen, LocalLM):
        raise TypeError(
            "A weights step trains a LoRA adapter, so the student must run on a LocalLM (a transformers + PEFT "
            f"model); found {type(chosen).__name__ if chosen is not None else 'no LM'}. Pass lm=LocalLM(...), "
            "set it on the program (program.set_lm(lm)) or dspy.configure(lm=LocalLM(...))."
        )
    return chosen


def rollout(student: dspy.Module, example: dspy.Example, metric: Callable[..., Any], lm: LocalLM,
            adapter: dspy.Adapter, use_labels: bool = True, threshold: float = 1.0) -> Rollout:
    """Run ``student`` on ``example`` under the policy's own adapter and score it: the scored responses."""
    from rosa2_dspy.weights import ScoredResponse

    raw: list = []
    prediction, error = None, ""
    with lm_scope(None, raw), dspy.context(lm=lm, adapter=adapter, trace=[]):
        try:
            prediction = student(**example.inputs())
        except Exception as err:  # a program that breaks on this example is a failure to push down
            error = f"{type(err).__name__}: {err}"
        trace = list(dspy.settings.trace)
    if prediction is None:
        result = Rollout(example, None, 0.0, error=error)
    else:
        verdict = call_feedback(metric, example, prediction, None, threshold=threshold)
        result = Rollout(example, prediction, verdict.score, verdict.feedback)
    result.responses = [ScoredResponse(r.messages, r.text, result.score, "current") for r in raw]
    if prediction is None:
        return result
    references = []
    if verdict.reference:
        references.append((dict(verdict.reference), 1.0))
    labels = {k: example[k] for k in example.labels().keys()}
    if use_labels and labels and labels != (references[0][0] if references else None):
        preferred = dspy.Prediction(**{**dict(prediction.items()), **labels})
        references.append((labels, call_feedback(metric, example, preferred, None, threshold=threshold).score))
    aligned = len(raw) == len(trace)
    for index, (predictor, inputs, outputs) in enumerate(trace):
        signature = predictor.signature
        for reference, reward in references:
            named = {k: v for k, v in reference.items() if k in signature.output_fields}
            if not named:
                continue
            own = raw[index].text if aligned else None
            messages = raw[index].messages if aligned else adapter.format(signature, predictor.demos, inputs)
            values = {**dict(outputs.items()), **named}
            bare = len(signature.output_fields) == 1 and own is not None and not field_header_pattern.search(own)
            completion = (str(next(iter(named.values()))) if bare
                          else adapter.format_assistant_message_content(signature, values))
            result.responses.append(ScoredResponse(messages, completion, float(reward), "reference"))
    return result


def compile_program(optimizer: "WeightOptimizer", student: dspy.Module, trainset: Sequence[dspy.Example],
                    metric: Callable[..., Any], *, batch_size: int = 1, epochs: int = 1, use_labels: bool = True,
                    lm: dspy.BaseLM | None = None, adapter: dspy.Adapter | None = None,
                    threshold: float = 1.0) -> dspy.Module:
    """The teleprompter loop behind ``WeightOptimizer.compile`` (see the module docstring)."""
    if metric is None:
        raise ValueError("compile(student, trainset=..., metric=...) needs a metric to score the student's answers.")
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size and epochs must be >= 1.")
    if not all(isinstance(e, dspy.Example) and e._input_keys for e in trainset):
        raise TypeError("trainset must hold dspy.Example objects with their inputs marked: "
                        "dspy.Example(question=..., answer=...).with_inputs('question').")
    from rosa2_dspy.rosa2 import ROSA2

    if isinstance(student, ROSA2):
        raise TypeError("compile() adapts a program's model offline; a ROSA2 adapts online per session. Compile "
                        "the wrapped program (rosa2.program) or use ROSA2.interact / Interaction instead.")
    local = local_lm_of(student, lm)
    adapter = adapter or dspy.settings.adapter or LenientChatAdapter()
    optimizer.history = []
    for epoch in range(epochs):
        for start in range(0, len(trainset), batch_size):
            batch = [rollout(student, e, metric, local, adapter, use_labels, threshold)
                     for e in trainset[start:start + batch_size]]
            step = optimizer.step(local.policy, [r for b in batch for r in b.responses])
            optimizer.last_step = step
            optimizer.history.append({"epoch": epoch, "examples": len(batch),
                                      "mean_score": sum(r.score for r in batch) / len(batch),
                                      "errors": [r.error for r in batch if r.error], "step": step.summary()})
            if not step.applied:
                logger.info("%s: no update from examples %d-%d (%s).", optimizer.name, start,
                            start + len(batch) - 1, step.reason)
    return student
