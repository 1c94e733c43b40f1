"""The main job (``make run``): the ROSA2 mode comparison on the embedded default model, on this CPU.

Runs ``programs/configs/default.json`` — the intent task (hidden user intent revealed by a simulated
user's feedback), five modes, the embedded SmolLM2-135M-Instruct as actor and refiner — then prints the
results table and writes ``results/<name>.json`` and ``results/<name>.png``. Any other config:
``python -m programs.main --config math`` (or a JSON path); see ``programs/experiment.py``.
"""

from __future__ import annotations

from programs.experiment import main

if __name__ == "__main__":
    main()
