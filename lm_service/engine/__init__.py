"""The 5 Hz LM engine: token ids in, token ids out, with classifier-free guidance.

Two backends with one API (``start``, ``submit(request) -> async iterator of events``,
``abort(request_id)``, ``stats()``, ``shutdown``):

* ``vllm_engine.VllmLmEngine``: vLLM's ``AsyncLLM`` with continuous batching; ``scheduler`` keeps
  the conditional and unconditional sequences of a guided request in lock-step and
  ``logits_processor`` picks every token;
* ``hf_backend.HfLmEngine``: transformers, one request at a time; the reference in tests and the
  engine where vLLM is absent.

Both pick tokens with ``decoding.GuidedDecoder`` (``sampling``: guidance, constraint, penalties,
temperature, top-k, top-p, seeded sampling). Importing this package does not import vLLM.
"""

from lm_service.engine.config import LmEngineConfig
from lm_service.engine.stats import EngineStats
from lm_service.engine.types import (
    ConstraintRef,
    FinishReason,
    LmEvent,
    LmFinished,
    LmGenerateRequest,
    LmProgress,
    SamplingSettings,
)

__all__ = [
    "ConstraintRef",
    "EngineStats",
    "FinishReason",
    "LmEngineConfig",
    "LmEvent",
    "LmFinished",
    "LmGenerateRequest",
    "LmProgress",
    "SamplingSettings",
]
