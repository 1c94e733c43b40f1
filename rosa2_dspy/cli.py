"""``rosa2-chat``: talk to a ROSA2-wrapped program and watch its words and weights change turn by turn.

Type a question; the program answers. Then type feedback ("no, I meant in meters"); ROSA2 refines the
instruction and updates the adapter and answers again. Commands:

    /ok              accept the answer (ends the question; the next line is a new question)
    /score X TEXT    feedback with a score X in [0, 1] (plain feedback counts as score 0)
    /answer TEXT     reveal the right answer to this question (the weights step's reference response until
                     the question ends: /ok, /new, /load or a new question)
    /new             start a new conversation (fresh instruction and adapter); /carry keeps adaptation
    /save DIR        save the session state (adapters as safetensors); /load DIR loads it (and ends the question)
    /quit

The answer is printed as it is generated (``--no-stream``: whole). Errors are reported and the chat goes on.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import dspy

from rosa2_dspy.rosa2 import MODES, ROSA2

PROGRAMS = {"cot": dspy.ChainOfThought, "predict": dspy.Predict}
COMMANDS = "/ok, /score X TEXT, /answer TEXT, /new, /carry, /save DIR, /load DIR, /quit"


def _print_token(text: str) -> None:
    print(text, end="", flush=True)


class _Chat:
    """One chat's state: the question being worked on and the reference answer revealed for it."""

    def __init__(self, rosa2: ROSA2, write: Callable[[str], None], write_token: Callable[[str], None] | None):
        self.rosa2, self.write, self.write_token = rosa2, write, write_token
        predictors = [p for _, p in rosa2.program.named_predictors()]
        self.input_field = next(iter(predictors[0].signature.input_fields))
        self.answer_field = list(predictors[-1].signature.output_fields)[-1]
        self.question: str | None = None
        self.reference: dict[str, Any] | None = None  # belongs to self.question only
        # ROSA2 runs a per-session copy of the program, so a listener given to streamify (keyed to the
        # original predictor) would never match; the raw chunks go to a listener here instead.
        self.streamed = dspy.streamify(rosa2, async_streaming=False) if write_token else None

    def end_question(self) -> None:
        self.question, self.reference = None, None

    def handle(self, line: str) -> bool:
        """Act on one line; False ends the chat."""
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if not command.startswith("/"):
            if self.question is None:
                self.question, self.reference = line, None
                self.ask()
            else:
                self.feedback(line, 0.0)
        elif command == "/quit":
            return False
        elif command in ("/new", "/carry"):
            previous = self.rosa2.current_session_id
            self.rosa2.start_session(carry_over_from=previous if command == "/carry" else None)
            self.end_question()
            self.write(f"new conversation {self.rosa2.current_session_id}")
        elif command == "/save":
            self.write(f"saved to {self.rosa2.save(rest or 'rosa2_state')}")
        elif command == "/load":
            self.rosa2.load(rest or "rosa2_state")
            self.end_question()  # the loaded session has no answer awaiting feedback
            self.write("loaded; ask a question.")
        elif command not in ("/ok", "/answer", "/score"):
            self.write(f"unknown command {command}; commands: {COMMANDS}")
        elif self.question is None:
            self.write(f"{command} is about an answer; ask a question first.")
        elif command == "/ok":
            self.rosa2.adapt({"score": 1.0, "feedback": "correct"})
            self.end_question()
            self.write("accepted.")
        elif command == "/answer":
            if not rest:
                self.write("usage: /answer TEXT (the right answer to this question)")
            else:
                self.reference = {self.answer_field: rest}
                self.write("noted for this question; now say what was wrong (or /score).")
        else:  # /score
            value, _, text = rest.partition(" ")
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not 0.0 <= score <= 1.0:  # also refuses nan
                self.write("usage: /score X TEXT, with X in [0, 1]")
            else:
                self.feedback(text, score)
        return True

    def feedback(self, text: str, score: float) -> None:
        record = self.rosa2.adapt(text, score=score, reference=self.reference)
        for name, words in record.words.items():
            status = "refined" if words["accepted"] else f"kept ({words['reason']})"
            self.write(f"[words] {name}: {status}: {self.rosa2.session.instructions[name]}")
        if record.weights is not None:
            status = "applied" if record.weights["applied"] else f"skipped ({record.weights['reason']})"
            self.write(f"[weights] {status}: |Δθ| = {record.delta_norm:.4g} "
                       f"({record.times['weights']:.1f}s; words {record.times['words']:.1f}s)")
        if record.solved:
            self.end_question()
        else:
            self.ask()

    def ask(self) -> None:
        try:
            self._ask()
        except BaseException:  # no answer awaits feedback: the next line is a new question
            self.end_question()
            raise

    def _ask(self) -> None:
        head = f"[turn {len(self.rosa2.session.turns) + 1}] {self.answer_field}: "
        inputs = {self.input_field: self.question}
        if self.streamed is None:
            self.write(head + str(self.rosa2(**inputs)[self.answer_field]))
            return
        # What is shown as it comes: the answer field's section when the model writes DSPy's sections (a
        # StreamListener picks it out), else the model's plain text, which the lenient adapter makes the
        # answer, until a "[" suggests sections after all. Whitespace at either end is held back.
        listener, shown, raw, held, prediction = dspy.streaming.StreamListener(self.answer_field), [], "", "", None

        def show(text: str) -> None:
            nonlocal held
            text = held + text if shown else text.lstrip()
            held = text[len(text.rstrip()):]
            if text.rstrip():
                self.write_token(("" if shown else head) + text.rstrip())
                shown.append(text.rstrip())

        with dspy.context(adapter=dspy.ChatAdapter()):  # ROSA2's adapters write ChatAdapter's sections
            for value in self.streamed(**inputs):
                if isinstance(value, dspy.Prediction):
                    prediction, response = value, listener.finalize()
                    show(response.chunk if response else "")
                    continue
                response, text = listener.receive(value), _chunk_text(value)
                if listener.stream_start:
                    show(response.chunk if response else "")
                elif "[" not in raw + text:
                    show(text)
                raw += text
        answer = str(prediction[self.answer_field])
        if shown:
            self.write_token("\n")
        if not shown or "".join(shown) != answer.strip():  # nothing streamed, or the parse differs from it
            self.write(head + answer)


def _chunk_text(value: Any) -> str:
    """The text of a streamed LM chunk (DSPy's EngineChunk); "" for anything else (status messages)."""
    try:
        return value.choices[0].delta.content or ""
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""


def run_chat(rosa2: ROSA2, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
             write_token: Callable[[str], None] | None = None) -> None:
    """The chat loop, with injectable input/output so that it can be driven by a script or a test.

    ``write`` gets whole lines; ``write_token``, if given, gets the answer's text as it is generated (then
    ``write`` gets the answer only when nothing could be streamed, e.g. the model wrote no answer section).
    Every error is reported as a line and the loop goes on; only ``/quit``, end of input or Ctrl-C end it.
    """
    chat = _Chat(rosa2, write, write_token)
    write(f"ROSA2 chat, mode={rosa2.mode}. Ask a question; then give feedback. /quit to leave.")
    while True:
        try:
            line = read("question> " if chat.question is None else "feedback> ").strip()
        except EOFError:
            return
        if not line:
            continue
        try:
            if not chat.handle(line):
                return
        except Exception as err:  # noqa: BLE001 - the chat reports what went wrong and goes on
            write(f"error: {err}")


def main(argv: list[str] | None = None, read: Callable[[str], str] = input,
         write: Callable[[str], None] = print, write_token: Callable[[str], None] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rosa2-chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a local checkpoint folder or a hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default="joint", choices=MODES)
    parser.add_argument("--program", default="cot", choices=sorted(PROGRAMS))
    parser.add_argument("--signature", default="question -> answer")
    parser.add_argument("--refiner-lm", default=None,
                        help="litellm model string for the words step (default: the local actor)")
    parser.add_argument("--refiner-style", default="requirements", choices=("requirements", "rewrite"),
                        help="the words step: list the missing requirements and merge them (default), or "
                             "rewrite the whole instruction (for strong refiners)")
    parser.add_argument("--refiner-api-base", default=None,
                        help="address of an OpenAI-compatible server for --refiner-lm 'openai/<model>' "
                             "(a vLLM or llama.cpp server: http://127.0.0.1:8000/v1)")
    parser.add_argument("--refiner-api-key", default=None,
                        help="the refiner's API key (default: the provider's variable, e.g. OPENAI_API_KEY); "
                             "a local server that checks none takes any, e.g. 'local'")
    parser.add_argument("--refiner-fallback", default=None, choices=("keep", "append"),
                        help="what an unusable rewrite becomes (default: 'append' with the local refiner, "
                             "whose rewrites are rarely usable; 'keep' with --refiner-lm)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-stream", action="store_true", help="print each answer whole, not as it is generated")
    args = parser.parse_args(argv)
    if (args.refiner_api_base or args.refiner_api_key) and not args.refiner_lm:
        parser.error("--refiner-api-base and --refiner-api-key need --refiner-lm (e.g. --refiner-lm openai/MODEL).")

    from rosa2_dspy.local_lm import LocalLM

    actor = LocalLM(args.model, device=args.device, dtype=args.dtype, max_tokens=args.max_tokens)
    client = {k: v for k, v in (("api_base", args.refiner_api_base), ("api_key", args.refiner_api_key)) if v}
    refiner = dspy.LM(args.refiner_lm, **client) if args.refiner_lm else None
    fallback = args.refiner_fallback or ("keep" if refiner else "append")
    rosa2 = ROSA2(PROGRAMS[args.program](args.signature), actor, mode=args.mode, refiner_lm=refiner,
                  refiner_style=args.refiner_style, refiner_fallback=fallback)
    try:
        if write_token is None and write is print:
            write_token = _print_token
        run_chat(rosa2, read, write, None if args.no_stream else write_token)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
