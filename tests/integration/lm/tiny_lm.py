"""A tiny 5 Hz LM checkpoint for engine tests, in the layout published LM checkpoints may use.

It starts from the shared tiny writer (``devtools.tiny_checkpoints.write_lm``: tokenizer, config,
generation config) and replaces the weights with larger random values, so that the model is not
degenerate (it does not repeat one token) and guided greedy output differs from unguided. The
safetensors file stores the names WITHOUT the ``model.`` prefix and no ``lm_head.weight`` (the
embeddings are tied), so every engine test also covers that loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3ForCausalLM

from devtools.tiny_checkpoints import LM_DIR, write_lm

WEIGHT_STD = 0.5


def write_test_lm(root: Path, seed: int = 0, std: float = WEIGHT_STD) -> Path:
    """Write the checkpoint into ``root/acestep-5Hz-lm-0.6B`` and return that folder."""
    out_dir = root / LM_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_lm(out_dir, seed)
    model = Qwen3ForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to the embeddings
            if tensor.dim() >= 2:
                tensor = torch.randn(tensor.shape, generator=generator) * std
            state[name.removeprefix("model.")] = tensor.contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
