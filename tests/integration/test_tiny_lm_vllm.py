"""vLLM loads the tiny 5 Hz LM checkpoint and generates audio-code tokens from it.

Starting a vLLM engine costs tens of seconds on a CPU, so this is one test, marked ``vllm``.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from shared import audio_codes
from devtools import tiny_checkpoints as tc
from shared import tiny_tokenizers as tt

pytestmark = pytest.mark.vllm

NUM_CODES = 12


def test_vllm_generates_audio_codes_from_the_tiny_lm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm  # here, not at the top: collecting the fast tests should not pay for importing vLLM
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    tc.write_all(tmp_path, seed=0, steps=[tc.WriterStep(tc.LM_DIR, tc.write_lm)])
    llm = vllm.LLM(model=str(tmp_path / tc.LM_DIR), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0)
    try:
        tokenizer = llm.get_tokenizer()
        first_code_id = tokenizer.convert_tokens_to_ids("<|audio_code_0|>")
        code_ids = list(range(first_code_id, first_code_id + audio_codes.NUM_AUDIO_CODES))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "# Caption\nslow piano\n\n# Lyric\n[Instrumental]\n"}],
            tokenize=False, add_generation_prompt=True,
        )
        params = vllm.SamplingParams(
            max_tokens=NUM_CODES, min_tokens=NUM_CODES, temperature=1.0, seed=3,
            allowed_token_ids=code_ids + [tokenizer.convert_tokens_to_ids(tt.EOS_TOKEN)],
            skip_special_tokens=False,
        )
        outputs = llm.generate([prompt, prompt], params)
    finally:
        del llm
        gc.collect()
    for output in outputs:
        token_ids = list(output.outputs[0].token_ids)
        assert len(token_ids) == NUM_CODES
        assert all(token in code_ids for token in token_ids)
        assert audio_codes.parse_codes(output.outputs[0].text) == [t - first_code_id for t in token_ids]
