"""``rosa2-chat``: talk to a ROSA2-wrapped program and watch its words and weights change turn by turn.

Type a question; the program answers. Then type feedback ("no, I meant in meters"); ROSA2 refines the
instruction and updates the adapter and answers again. Commands:

    /ok              accept the answer (ends the question; the next line is a new question)
    /score X TEXT    feedback with a score X in [0, 1] (plain feedback counts as score 0)
    /answer TEXT     reveal the right answer (used by the weights step as a reference response)
    /new             start a new conversation (fresh instruction and adapter); /carry keeps adaptation
    /save DIR        save the session state (adapters as safetensors); /load DIR loads it
    /quit
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import dspy

from rosa2_dspy.errors import Rosa2Error
from rosa2_dspy.rosa2 import MODES, ROSA2

PROGRAMS = {"cot": dspy.ChainOfThought, "predict": dspy.Predict}


def run_chat(rosa2: ROSA2, read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> None:
    """The chat loop, with injectable input/output so that it can be driven by a script or a test."""
    question, reference = None, None
    output_field = list(rosa2.program.named_predictors())[-1][1].signature.output_fields
    answer_field = list(output_field)[-1]
    input_field = list(list(rosa2.program.named_predictors())[0][1].signature.input_fields)[0]
    write(f"ROSA2 chat, mode={rosa2.mode}. Ask a question; then give feedback. /quit to leave.")
    while True:
        try:
            line = read("question> " if question is None else "feedback> ").strip()
        except EOFError:
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return
        if command in ("/new", "/carry"):
            previous = rosa2.current_session_id
            rosa2.start_session(carry_over_from=previous if command == "/carry" else None)
            question = None
            write(f"new conversation {rosa2.current_session_id}")
            continue
        if command == "/save":
            write(f"saved to {rosa2.save(rest or 'rosa2_state')}")
            continue
        if command == "/load":
            try:
                rosa2.load(rest or "rosa2_state")
                write("loaded")
            except Rosa2Error as err:
                write(f"error: {err}")
            continue
        if question is None:
            question = line
        elif command == "/ok":
            rosa2.adapt({"score": 1.0, "feedback": "correct"})
            write("accepted.")
            question = None
            continue
        elif command == "/answer":
            reference = {answer_field: rest}
            write("noted; now say what was wrong (or /score).")
            continue
        else:
            score, text = 0.0, line
            if command == "/score":
                value, _, text = rest.partition(" ")
                try:
                    score = float(value)
                except ValueError:
                    write("usage: /score X TEXT, with X in [0, 1]")
                    continue
            try:
                record = rosa2.adapt(text, score=score, reference=reference)
            except Rosa2Error as err:
                write(f"error: {err}")
                continue
            reference = None
            for name, words in record.words.items():
                status = "refined" if words["accepted"] else f"kept ({words['reason']})"
                write(f"[words] {name}: {status}: {rosa2.session.instructions[name]}")
            if record.weights is not None:
                status = "applied" if record.weights["applied"] else f"skipped ({record.weights['reason']})"
                write(f"[weights] {status}: |Δθ| = {record.delta_norm:.4g} "
                      f"({record.times['weights']:.1f}s; words {record.times['words']:.1f}s)")
            if record.solved:
                question = None
                continue
        prediction = rosa2(**{input_field: question})
        write(f"[turn {len(rosa2.session.turns) + 1}] {answer_field}: {prediction[answer_field]}")


def main(argv: list[str] | None = None, read: Callable[[str], str] = input,
         write: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(prog="rosa2-chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a local checkpoint folder or a hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default="joint", choices=MODES)
    parser.add_argument("--program", default="cot", choices=sorted(PROGRAMS))
    parser.add_argument("--signature", default="question -> answer")
    parser.add_argument("--refiner-lm", default=None,
                        help="litellm model string for the words step (default: the local actor)")
    parser.add_argument("--refiner-fallback", default=None, choices=("keep", "append"),
                        help="what an unusable rewrite becomes (default: 'append' with the local refiner, "
                             "whose rewrites are rarely usable; 'keep' with --refiner-lm)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    from rosa2_dspy.local_lm import LocalLM

    actor = LocalLM(args.model, device=args.device, dtype=args.dtype, max_tokens=args.max_tokens)
    refiner = dspy.LM(args.refiner_lm) if args.refiner_lm else None
    fallback = args.refiner_fallback or ("keep" if refiner else "append")
    rosa2 = ROSA2(PROGRAMS[args.program](args.signature), actor, mode=args.mode, refiner_lm=refiner,
                  refiner_fallback=fallback)
    try:
        run_chat(rosa2, read, write)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
