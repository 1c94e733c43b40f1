"""The main job (interim): a scripted multi-turn chat with the embedded local model under DSPy."""

from __future__ import annotations

import dspy

from rosa2_dspy import LenientChatAdapter, LocalLM


def main() -> None:
    lm = LocalLM("embedded", max_tokens=96)
    dspy.configure(lm=lm, adapter=LenientChatAdapter())
    chat = dspy.ChainOfThought("history: dspy.History, question -> answer")
    history = dspy.History(messages=[])
    for question in ["What is 7 + 5?", "Now double it.", "Say the result in words."]:
        prediction = chat(history=history, question=question)
        print(f"user: {question}\nmodel: {prediction.answer}\n")
        history.messages.append({"question": question, "answer": prediction.answer})


if __name__ == "__main__":
    main()
