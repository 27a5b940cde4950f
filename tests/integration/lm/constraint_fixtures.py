"""A small token constraint for engine tests (same protocol as ``lm_service.constraints``).

``load_code_vocab(tokenizer_dir)`` reads the audio-code token ids from ``tokenizer.json``;
``build_code_constraint(vocab, spec, prompt_token_ids)`` allows only the codes
``[spec["first_code"], spec["first_code"] + spec["num_codes"])`` that do not occur in the prompt,
and is finished after ``spec["length"]`` tokens. ``spec["fail_after"]``, when given, makes it raise
after that many tokens (a failing constraint must end only its own request). Both run inside
vLLM's worker process, found by their import paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

VOCAB_LOADER = "tests.integration.lm.constraint_fixtures:load_code_vocab"
BUILDER = "tests.integration.lm.constraint_fixtures:build_code_constraint"
_CODE_TOKEN = re.compile(r"^<\|audio_code_(\d+)\|>$")


def load_code_vocab(tokenizer_dir: str) -> dict[str, Any]:
    added = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["added_tokens"]
    codes = {int(m.group(1)): token["id"] for token in added if (m := _CODE_TOKEN.match(token["content"]))}
    return {"code_ids": [codes[code] for code in sorted(codes)]}


class CodeConstraint:
    def __init__(self, allowed: list[int], length: int, fail_after: int = -1) -> None:
        self.allowed = torch.tensor(allowed, dtype=torch.long)
        self.length = length
        self.fail_after = fail_after
        self.num_seen = 0

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if 0 <= self.fail_after <= self.num_seen:
            raise RuntimeError("the test constraint fails on purpose")
        keep = logits[self.allowed].clone()
        logits.fill_(float("-inf"))
        logits[self.allowed] = keep
        return logits

    def advance(self, token_id: int) -> None:
        self.num_seen += 1

    @property
    def is_finished(self) -> bool:
        return self.num_seen >= self.length


def build_code_constraint(vocab: dict[str, Any], spec: dict[str, Any], prompt_token_ids: list[int]) -> CodeConstraint:
    first, count = int(spec["first_code"]), int(spec["num_codes"])
    in_prompt = set(prompt_token_ids)
    allowed = [t for t in vocab["code_ids"][first:first + count] if t not in in_prompt]
    return CodeConstraint(allowed, int(spec["length"]), int(spec.get("fail_after", -1)))
