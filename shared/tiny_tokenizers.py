"""Tiny byte-level BPE tokenizers in the layout of the published ACE-Step 1.5 checkpoints.

Two tokenizers are built here, both trained on a small built-in English/music corpus with the
Qwen2 normalizer (NFC), pre-tokenizer (the Qwen split pattern, which puts every digit in its own
token, then byte-level) and byte-level decoder:

* the 5 Hz LM tokenizer: the BPE vocabulary, then ``<|endoftext|>`` (pad), ``<|im_start|>``,
  ``<|im_end|>`` (eos), ``<think>``, ``</think>`` and ``<|audio_code_0|>`` ... ``<|audio_code_63999|>``
  at contiguous ids in that order (the published layout, shifted down to a small base id), plus the
  chat template read from ``lm_service/chat_template.jinja``;
* the text-encoder tokenizer (Qwen3-Embedding): the BPE vocabulary plus ``<|endoftext|>`` (pad),
  ``<|im_start|>``, ``<|im_end|>`` (eos), with a post-processor that appends ``<|endoftext|>`` to
  every sequence, as the published Qwen3-Embedding tokenizer does.

Both are saved with ``tokenizer_class = "Qwen2Tokenizer"``, the class the published checkpoints name,
so ``AutoTokenizer.from_pretrained`` takes the same code path as with the real files.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from shared.constants import KEYSCALES, NUM_AUDIO_CODES, TRACK_NAMES, VALID_LANGUAGES

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_TOKEN = "<think>"
END_THINK_TOKEN = "</think>"
CHAT_TEMPLATE_PACKAGE = "lm_service"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The split pattern of the Qwen2/Qwen3 tokenizers: letters group, every digit stands alone.
_QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LM_BPE_VOCAB_SIZE = 1024
_TEXT_BPE_VOCAB_SIZE = 768
_MODEL_MAX_LENGTH = 131072

_CORPUS_TEXT = """\
system user assistant
# Instruction
Generate audio semantic tokens based on the given conditions:
Understand the given musical conditions and describe the audio semantics accordingly:
Expand the user's input into a more detailed and specific musical description:
Format the user's input into a more detailed and specific musical description:
Fill the audio semantic mask based on the given conditions:
# Caption
An upbeat synth-pop track with a bright female vocal, warm pads and a steady four-on-the-floor beat.
Dreamy lo-fi hip hop with dusty drums, mellow piano chords and vinyl crackle.
Aggressive heavy metal with distorted guitars, double kick drums and a screaming male vocal.
A slow acoustic folk ballad with fingerpicked guitar, soft strings and a gentle voice.
Energetic electronic dance music with a big drop, sidechained bass and a catchy lead synth.
Smooth jazz with a walking bass line, brushed drums, saxophone solo and Rhodes piano.
Cinematic orchestral score with brass, timpani, choir and soaring violins.
# Metas
- bpm: 120
- timesignature: 4
- keyscale: F# minor
- duration: 95 seconds
# Languages
en
# Lyric
[Intro]
[Verse 1]
Neon lights are calling, calling out your name
[Pre-Chorus]
Hold on, hold on, we are running through the rain
[Chorus]
Sing it loud tonight, we will never be the same
[Bridge]
Every heartbeat, every step, every word I say
[Verse 2]
Walking down the empty street at 3 in the morning
[Outro]
[Instrumental]
[Guitar Solo]
[Break]
<think>
bpm: 128
caption: A driving rock song with electric guitars and a powerful male vocal.
duration: 180
genres: rock, pop, electronic, jazz, classical, hip hop, metal, folk, country, blues, reggae
keyscale: Bb major
language: en
timesignature: 3
</think>
NO USER INPUT
0 1 2 3 4 5 6 7 8 9 10 30 60 90 100 120 150 200 240 300 600 2/4 3/4 4/4 6/8
tempo fast slow medium major minor sharp flat # \u266f \u266d bpm keyscale timesignature duration
caption language lyrics genre mood instrument vocal female male choir drums bass guitar piano
"""


def training_corpus() -> list[str]:
    """The built-in corpus: prompt skeletons, captions, lyrics and every value the metadata uses."""
    lines = [line for line in _CORPUS_TEXT.splitlines() if line]
    lines.append(" ".join(KEYSCALES))
    lines.append(" ".join(VALID_LANGUAGES))
    lines.append(" ".join(TRACK_NAMES))
    lines.extend(f"bpm: {bpm}\nduration: {bpm * 2}" for bpm in range(30, 301, 7))
    return lines


def audio_code_tokens() -> list[str]:
    """``<|audio_code_0|>`` ... ``<|audio_code_63999|>`` in code order."""
    return [f"<|audio_code_{code}|>" for code in range(NUM_AUDIO_CODES)]


def load_chat_template() -> str:
    """The LM chat template, read from ``lm_service/chat_template.jinja``.

    Raises:
        FileNotFoundError: the template file is not there.
    """
    resource = importlib.resources.files(CHAT_TEMPLATE_PACKAGE).joinpath(CHAT_TEMPLATE_FILE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the LM chat template {CHAT_TEMPLATE_PACKAGE}/{CHAT_TEMPLATE_FILE} is missing; "
            "the tiny LM tokenizer needs it"
        )
    return resource.read_text(encoding="utf-8")


def build_lm_tokenizer(out_dir: Path | str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny 5 Hz LM tokenizer, save it into ``out_dir`` and return it.

    Args:
        out_dir: folder to save into (created if missing).
        chat_template: Jinja chat template; ``None`` reads ``lm_service/chat_template.jinja``.

    Returns:
        The tokenizer. ``<|endoftext|>`` is the pad token and ``<|im_end|>`` the eos token; the ids
        of ``<|audio_code_N|>`` are ``tokenizer.convert_tokens_to_ids("<|audio_code_0|>") + N``.
    """
    template = load_chat_template() if chat_template is None else chat_template
    backend = _train_bpe(_LM_BPE_VOCAB_SIZE)
    backend.add_special_tokens([_special(PAD_TOKEN), _special(IM_START_TOKEN), _special(EOS_TOKEN)])
    # Qwen3 registers the think tags as added tokens that are not "special".
    backend.add_tokens([_added(THINK_TOKEN, special=False), _added(END_THINK_TOKEN, special=False)])
    backend.add_special_tokens([_special(token) for token in audio_code_tokens()])
    tokenizer = _wrap(backend, eos_token=EOS_TOKEN)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_text_encoder_tokenizer(out_dir: Path | str) -> PreTrainedTokenizerFast:
    """Build the tiny Qwen3-Embedding tokenizer, save it into ``out_dir`` and return it.

    Every encoded sequence ends with ``<|endoftext|>`` (``TemplateProcessing``), as with the
    published tokenizer; ``<|endoftext|>`` is also the pad token.
    """
    backend = _train_bpe(_TEXT_BPE_VOCAB_SIZE)
    backend.add_special_tokens([_special(PAD_TOKEN), _special(IM_START_TOKEN), _special(EOS_TOKEN)])
    pad_id = backend.token_to_id(PAD_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {PAD_TOKEN}:0",
        pair=f"$A:0 {PAD_TOKEN}:0 $B:1 {PAD_TOKEN}:1",
        special_tokens=[(PAD_TOKEN, pad_id)],
    )
    tokenizer = _wrap(backend, eos_token=EOS_TOKEN)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on the built-in corpus (deterministic)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(), trainer)
    return backend


def _wrap(backend: Tokenizer, eos_token: str) -> PreTrainedTokenizerFast:
    return Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def _special(content: str) -> AddedToken:
    return _added(content, special=True)


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
