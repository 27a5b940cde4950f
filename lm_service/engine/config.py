"""LM engine configuration (a frozen dataclass; the service's config module fills it)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidArgument, out_of_range

DEFAULT_MAX_MODEL_LEN = 4096  # reference §1.4


@dataclass(frozen=True)
class LmEngineConfig:
    """How to build the LM engine.

    Attributes:
        model_dir: checkpoint folder (``acestep-5Hz-lm-*``) with config, tokenizer and safetensors.
        dtype: ``"float32"`` (CPU), ``"bfloat16"`` (GPU) or ``"auto"``.
        max_model_len: longest sequence (prompt + output) of either stream of a request.
        max_num_seqs: most sequences in one step; a guided request uses two.
        kv_cache_gib: KV cache size; 0 lets vLLM size it from free accelerator memory.
        gpu_memory_utilization: vLLM's share of GPU memory when ``kv_cache_gib`` is 0.
        enable_prefix_caching: share KV blocks between prompts with a common prefix (a guided
            pair's prompts, the phases of one song).
        enforce_eager: no CUDA graphs / compilation (always on for CPU).
        device: ``"cpu"`` or ``"cuda"`` (vLLM picks its platform itself; this selects defaults).
        views_dir: where a renamed view of the checkpoint is written when vLLM needs one
            (see ``weights.py``); empty: ``acestep-vllm-views`` in the system temp folder.
        seed: engine-wide seed of vLLM (the per-request seeds decide sampling).
    """

    model_dir: Path
    dtype: str = "float32"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = 32
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    device: str = "cpu"
    views_dir: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise InvalidArgument(
                f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}", field="dtype"
            )
        if not 16 <= self.max_model_len <= 131072:
            raise out_of_range("max_model_len", self.max_model_len, 16, 131072, "tokens")
        if not 2 <= self.max_num_seqs <= 4096:
            raise out_of_range("max_num_seqs", self.max_num_seqs, 2, 4096)
        if self.kv_cache_gib < 0:
            raise InvalidArgument(f"kv_cache_gib must be >= 0 (0: automatic), got {self.kv_cache_gib!r}",
                                  field="kv_cache_gib")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise out_of_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.05, 0.99)
        if self.device not in ("cpu", "cuda"):
            raise InvalidArgument(f"device must be cpu or cuda, got {self.device!r}", field="device")

    @property
    def max_num_batched_tokens(self) -> int:
        """Token budget of one step: a whole guided pair of full-length prompts plus one decode
        token for every other sequence (chunked prefill is off, see ``scheduler.py``)."""
        return 2 * self.max_model_len + self.max_num_seqs

    def resolved_views_dir(self) -> Path:
        if self.views_dir:
            return Path(self.views_dir)
        return Path(tempfile.gettempdir()) / "acestep-vllm-views"
