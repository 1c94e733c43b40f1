"""The experiment's report: its tables (modes, paired comparisons, step counts, Theorem 4.1) on stdout,
``results/<name>.json`` and the accuracy-over-turns plot beside it (``programs.experiment`` writes them).

``python -m programs.experiment --reanalyse results/<name>.json`` re-reports a results file from its turn
records with the current measures (its runs and machine facts kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from programs.reporting import format_table, write_results
from programs.tasks import ORACLE, resolve_protocol
from rosa2_dspy.feedback.simulated_user import PROTOCOLS, REVEAL, SOLUTION
from rosa2_dspy.requirements import echoes
from rosa2_dspy.stats import METHOD, with_ci


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode; acc@k, turns-to-solve, mean turns and uplift as ``value [95% CI]``."""
    rows = []
    for mode, s in summaries.items():
        cis = s.get("accuracy_per_turn_ci") or [None] * len(s["accuracy_per_turn"])
        row: dict[str, Any] = {"mode": mode}
        row.update({f"acc@{k + 1}": with_ci(a, ci) for k, (a, ci) in enumerate(zip(s["accuracy_per_turn"], cis))})
        if mode == ORACLE:  # one answer per task: acc@1 is all it has
            rows.append(row)
            continue
        row.update({
            "turns-to-solve": with_ci(s["turns_to_solve"], s.get("turns_to_solve_ci")),
            "mean turns": with_ci(s["mean_turns"], s.get("mean_turns_ci")),
            "correction uplift": with_ci(s["correction_uplift"], s.get("correction_uplift_ci")),
            **({"reward@1": with_ci(s["reward_per_turn"][0], s["reward_per_turn_ci"][0]),
                f"reward@{len(s['reward_per_turn'])}": with_ci(s["reward_per_turn"][-1], s["reward_per_turn_ci"][-1])}
               if s.get("reward_per_turn") else {}),
            "mean |Δθ|": s["mean_delta_norm"],
            "degenerate at end": s["degenerate_final"],
            **{f"{p} s/turn": v for p, v in s["seconds_per_turn"].items()},
        })
        rows.append(row)
    return rows


def comparison_rows(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pair of modes: solved by the last turn, difference [95% CI], discordant tasks, McNemar p."""
    return [{
        "modes (a vs b)": f"{c['a']} vs {c['b']}",
        f"acc@{c['turn']} a": with_ci(c["accuracy_a"], None), f"acc@{c['turn']} b": with_ci(c["accuracy_b"], None),
        "a − b [95% CI]": with_ci(c["difference"], c["difference_ci"]),
        "only a solved": c["a_only"], "only b solved": c["b_only"], "McNemar p (exact)": round(c["mcnemar_p"], 4),
    } for c in comparisons]


def theorem_rows(theorem: dict[str, Any]) -> list[dict[str, Any]]:
    """Theorem 4.1's summary as one table row: turns measured and skipped, the ratio's quartiles, the share
    below 1 and the mean log-ratio with their intervals."""
    q = theorem.get("ratio_quantiles") or {}
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(theorem.get("skipped", {}).items())) or "0"
    return [{
        "turns (conversations)": f"{theorem['measured']} ({theorem['conversations']})",
        "skipped": skipped,
        "‖Δθ(x*)‖/‖Δθ(x)‖ q1 / median / q3": " / ".join(f"{q[k]:.3g}" for k in ("q1", "median", "q3")) if q else "–",
        "share < 1 [95% CI]": with_ci(theorem.get("share_below_1"), theorem.get("share_below_1_ci")),
        "mean log-ratio [95% CI]": with_ci(theorem.get("mean_log_ratio"), theorem.get("mean_log_ratio_ci"), 3),
        "same level: share < 1 [95% CI]": with_ci((theorem.get("same_level") or {}).get("share_below_1"),
                                                  (theorem.get("same_level") or {}).get("share_below_1_ci")),
        "reference": ", ".join(f"{k}: {v}" for k, v in sorted((theorem.get("reference_sources") or {}).items())) or "–",
    }]


def steps_rows(by_steps: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: the share solved by the last turn for each step count, ``value [95% CI] (n)``."""
    return [{"mode": mode, **{f"{steps} steps": f"{with_ci(g['accuracy'], g['accuracy_ci'])} (n={g['tasks']})"
                              for steps, g in groups.items()}} for mode, groups in by_steps.items()]


def revealed_in_words(trajectories: dict[str, list[list[dict[str, Any]]]]) -> dict[str, dict[str, int]]:
    """Per mode, over the turns after a reference was revealed (the ``answer`` protocol's
    :data:`~rosa2_dspy.feedback.simulated_user.REVEAL` sentence ending an earlier turn's feedback, or its
    :data:`~rosa2_dspy.feedback.simulated_user.SOLUTION`): how many ran under instructions that hold a
    revealed reference (a one-line answer verbatim, or a stretch of a solution that the words step's
    filter refuses, :func:`rosa2_dspy.requirements.echoes`): ``holding`` of ``turns``. The words step
    should state what the user wants, never the answer to one question. The reveal is read back from the
    feedback text (turn records do not keep the reference): a numeric hint that ends the feedback ("The
    correct answer is larger than 5.", which ``answer`` gives only for a task without a gold answer)
    would be read as a reveal too."""
    head, tail = REVEAL.split("{}")
    solution = SOLUTION.split("{}")[0]
    counts = {}
    for mode, conversations in trajectories.items():
        turns = holding = 0
        for conversation in conversations:
            revealed: list[str] = []
            for record in conversation:
                if revealed:
                    turns += 1
                    words = " ".join(str(v) for v in (record.get("instructions") or {}).values())
                    holding += any(value in words for value in revealed) or echoes(words, revealed)
                feedback = (record.get("feedback") or "").rstrip()
                start = feedback.rfind(head)
                if solution in feedback:
                    revealed.append(feedback[feedback.index(solution) + len(solution):])
                elif start >= 0 and feedback.endswith(tail) and "\n" not in feedback[start:]:
                    revealed.append(feedback[start + len(head): len(feedback) - len(tail)])
        counts[mode] = {"holding": holding, "turns": turns}
    return counts


def title_for(results: dict[str, Any]) -> str:
    """The table/plot title: task, actor and the feedback protocol (``answer`` reads "learning a revealed answer")."""
    config = results["config"]
    protocol = results.get("protocol") or resolve_protocol(config)[0]
    return (f"{config.get('task', 'intent')} · {config.get('actor', {}).get('model', 'embedded')} · "
            f"protocol {protocol} ({PROTOCOLS[protocol]})")


def plot_accuracy(summaries: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy over turns per mode with 95% bootstrap intervals as error bars (modes offset a little)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    oracle = summaries.get(ORACLE)
    summaries = {mode: s for mode, s in summaries.items() if mode != ORACLE}
    if oracle:  # the ceiling of the words step: first answers with the hidden intent in the instruction
        ax.axhline(oracle["accuracy_per_turn"][0], color="grey", linestyle="--", label="oracle (acc@1)")
        if oracle["accuracy_per_turn_ci"] and oracle["accuracy_per_turn_ci"][0]:
            ax.axhspan(*oracle["accuracy_per_turn_ci"][0], color="grey", alpha=0.12)
    width = 0.06 * max(len(summaries) - 1, 0)
    for j, (mode, s) in enumerate(summaries.items()):
        accuracy = s["accuracy_per_turn"]
        turns = list(range(1, len(accuracy) + 1))
        offset = (j / max(len(summaries) - 1, 1) - 0.5) * width
        cis = s.get("accuracy_per_turn_ci") or [None] * len(accuracy)
        lower = [a - ci[0] if ci else 0.0 for a, ci in zip(accuracy, cis)]
        upper = [ci[1] - a if ci else 0.0 for a, ci in zip(accuracy, cis)]
        ax.errorbar([t + offset for t in turns], accuracy, yerr=[lower, upper], marker="o", capsize=3, label=mode,
                    linewidth=2.5 if mode == "joint" else 1.5)
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy (solved by this turn), 95% CI")
    ax.set_ylim(-0.04, 1.04)
    ax.set_xticks(turns)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(results: dict[str, Any], name: str, machine: dict[str, Any] | None = None) -> dict[str, Path]:
    """Print the tables, write JSON and the accuracy-over-turns plot under ``results/``.

    ``machine`` keeps an earlier run's machine facts (when re-analysing its file); default: this machine."""
    title = title_for(results)
    rows = table_rows(results["summaries"])
    extra = {k: v for k, v in results.items()}
    extra["title"] = title
    if results.get("protocol") == "answer" and results.get("trajectories"):
        extra["revealed_in_words"] = revealed_in_words(results["trajectories"])
    if machine is not None:
        extra["machine"] = machine
    json_path = write_results(name, rows, extra=extra, title=title)
    if results.get("comparisons"):
        turn = results["comparisons"][0]["turn"]
        print(f"\nPaired comparisons on the same tasks, solved by turn {turn} ({results.get('statistics', METHOD)}):")
        print(format_table(comparison_rows(results["comparisons"])))
    if results.get("by_steps"):
        print(f"\nSolved by turn {results['config'].get('max_turns', 4)}, by the problem's number of steps:")
        print(format_table(steps_rows(results["by_steps"])))
    if results.get("oracle_comparisons"):
        print("\nOracle instruction vs each mode's first answer on the same tasks (acc@1):")
        print(format_table(comparison_rows(results["oracle_comparisons"])))
    plot = plot_accuracy(results["summaries"], json_path.with_suffix(".png"), title)
    theorem = results.get("theorem_4_1") or {}
    if theorem.get("measured") or theorem.get("skipped"):
        print(f"\nTheorem 4.1 (joint mode): the smallest shift raising log π(reference | context) by δ = "
              f"{theorem.get('delta', '–')} nats, refined words x* vs original x ({theorem['ci_method']}):")
        print(format_table(theorem_rows(theorem)))
    step_norms = results.get("step_norm_comparison") or {}
    if step_norms.get("pairs"):
        print(f"\nStep-norm comparison (joint mode, ROSA's own step under both contexts, {step_norms['pairs']} steps; "
              f"not Theorem 4.1's quantity): mean ‖Δθ‖ under x* = {step_norms['mean_refined']:.4g} vs under x = "
              f"{step_norms['mean_original']:.4g}; smaller under x* in {100 * step_norms['share_refined_smaller']:.0f}% of steps")
    print(f"wrote {plot}")
    return {"json": json_path, "plot": plot}
