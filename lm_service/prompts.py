"""Every prompt the 5 Hz LM receives, as chat messages, and their rendering with a chat template.

Builders return a ``ChatPrompt``: the exact ``messages`` / ``add_generation_prompt`` pair the
reference hands to ``apply_chat_template``, plus text appended after rendering (the codes-phase
CoT in the training-aligned layout). ``ChatPrompt.render(chat_template)`` renders it with a
checkpoint's own template the way transformers' ``apply_chat_template`` does. The strings are
checked byte for byte by the ``lm`` and ``lm_upstream_6439010`` sections of the conformance
vectors' ``prompts.json``.

The codes phase exists in two layouts (``CodesLayout``):

* ``LEGACY``: the CoT is a closed assistant turn, ``add_generation_prompt=False``; with a Qwen3
  template the prompt ends ``</think>\\n\\n<|im_end|>\\n``. Its unconditional prompt keeps the
  caption (or uses the negative prompt as caption) and has the CoT ``<think>\\n</think>``.
* ``TRAINING_ALIGNED`` (default): [system, user] with the generation prompt, then the CoT and
  ``"\\n\\n"`` appended to the open assistant turn. Its unconditional user message is the raw
  negative prompt (``NO USER INPUT`` when there is none) and its CoT ``<think>\\n\\n</think>``.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import jinja2
import jinja2.ext
import jinja2.sandbox

from shared.constants import NO_USER_INPUT

LM_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
UNDERSTAND_INSTRUCTION = "Understand the given musical conditions and describe the audio semantics accordingly:"
CREATE_SAMPLE_INSTRUCTION = "Expand the user's input into a more detailed and specific musical description:"
FORMAT_SAMPLE_INSTRUCTION = "Format the user's input into a more detailed and specific musical description:"

INSTRUMENTAL_LYRICS = "[Instrumental]"
LEGACY_EMPTY_COT = "<think>\n</think>"
EMPTY_COT = "<think>\n\n</think>"
COT_SEPARATOR = "\n\n"

CHAT_TEMPLATE_FILE = "chat_template.jinja"

Message = Mapping[str, str]


class CodesLayout(enum.Enum):
    """How the codes-phase prompt carries the CoT (see the module docstring)."""

    LEGACY = "legacy"
    TRAINING_ALIGNED = "training_aligned"


DEFAULT_CODES_LAYOUT = CodesLayout.TRAINING_ALIGNED


@dataclass(frozen=True)
class ChatPrompt:
    """One LM prompt before rendering.

    ``assistant_suffix`` is appended verbatim to the rendered text (text the model continues from
    inside an open assistant turn); ``ensure_trailing_newline`` appends ``"\\n"`` when the rendered
    text does not end with one (legacy codes phase).
    """

    messages: tuple[Message, ...]
    add_generation_prompt: bool
    assistant_suffix: str = ""
    ensure_trailing_newline: bool = False

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as fresh dicts, ready for ``apply_chat_template``."""
        return [dict(message) for message in self.messages]

    def render(self, chat_template: str) -> str:
        """The prompt text the LM is fed (special tokens still as text)."""
        text = render(self.message_dicts(), self.add_generation_prompt, chat_template) + self.assistant_suffix
        if self.ensure_trailing_newline and not text.endswith("\n"):
            text += "\n"
        return text


def default_chat_template() -> str:
    """The ChatML template our checkpoints ship (``lm_service/chat_template.jinja``)."""
    return resources.files(__package__).joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def render(
    messages: Sequence[Message], add_generation_prompt: bool, chat_template: str, **template_kwargs: object
) -> str:
    """Render ``messages`` with a jinja chat template exactly as ``apply_chat_template(tokenize=False)``.

    Same environment as transformers: sandboxed, ``trim_blocks``/``lstrip_blocks``, loop controls,
    ``raise_exception``, a non-escaping ``tojson``. Extra keyword arguments become template
    variables (e.g. ``enable_thinking``).
    """
    template = _compile(chat_template)
    return template.render(
        messages=[dict(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(chat_template)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def has_meaningful_negative_prompt(negative_prompt: str | None) -> bool:
    """True unless the negative prompt is empty, blank or the ``NO USER INPUT`` sentinel."""
    return bool(negative_prompt and negative_prompt.strip() and negative_prompt.strip() != NO_USER_INPUT)


def _system(instruction: str) -> Message:
    return {"role": "system", "content": f"# Instruction\n{instruction}\n\n"}


def _task_prompt(instruction: str, user_content: str, assistant_suffix: str = "") -> ChatPrompt:
    return ChatPrompt(
        messages=(_system(instruction), {"role": "user", "content": user_content}),
        add_generation_prompt=True,
        assistant_suffix=assistant_suffix,
    )


def _caption_lyrics(caption: str, lyrics: str) -> str:
    return f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n"


def cot_prompt(caption: str, lyrics: str) -> ChatPrompt:
    """text2music phase 1: the model writes the ``<think>`` metadata block.

    ``caption`` and ``lyrics`` are used verbatim (not stripped).
    """
    return _task_prompt(LM_INSTRUCTION, _caption_lyrics(caption, lyrics))


def cot_unconditional_prompt(lyrics: str, negative_prompt: str = NO_USER_INPUT) -> ChatPrompt:
    """CFG branch of phase 1: the caption section is dropped, or replaced by a meaningful negative prompt."""
    if has_meaningful_negative_prompt(negative_prompt):
        return _task_prompt(LM_INSTRUCTION, _caption_lyrics(negative_prompt, lyrics))
    return _task_prompt(LM_INSTRUCTION, f"# Lyric\n{lyrics}\n")


def codes_prompt(caption: str, lyrics: str, cot_text: str, layout: CodesLayout = DEFAULT_CODES_LAYOUT) -> ChatPrompt:
    """text2music phase 2: the model writes audio codes after ``cot_text`` (``<think>…</think>``).

    ``caption`` is the user's original caption, not the one in the CoT.
    """
    if layout is CodesLayout.LEGACY:
        return _legacy_codes_prompt(_caption_lyrics(caption, lyrics), cot_text)
    return _task_prompt(LM_INSTRUCTION, _caption_lyrics(caption, lyrics), cot_text + COT_SEPARATOR)


def codes_unconditional_prompt(
    caption: str,
    lyrics: str,
    negative_prompt: str = NO_USER_INPUT,
    layout: CodesLayout = DEFAULT_CODES_LAYOUT,
) -> ChatPrompt:
    """CFG branch of phase 2: an empty CoT (see ``CodesLayout`` for the user message)."""
    is_meaningful = has_meaningful_negative_prompt(negative_prompt)
    if layout is CodesLayout.LEGACY:
        user = _caption_lyrics(negative_prompt if is_meaningful else caption, lyrics)
        return _legacy_codes_prompt(user, LEGACY_EMPTY_COT)
    user = negative_prompt if is_meaningful else NO_USER_INPUT
    return _task_prompt(LM_INSTRUCTION, user, EMPTY_COT + COT_SEPARATOR)


def _legacy_codes_prompt(user_content: str, cot_text: str) -> ChatPrompt:
    return ChatPrompt(
        messages=(
            _system(LM_INSTRUCTION),
            {"role": "user", "content": user_content},
            {"role": "assistant", "content": cot_text},
        ),
        add_generation_prompt=False,
        ensure_trailing_newline=True,
    )


def understand_prompt(audio_codes: str) -> ChatPrompt:
    """Codes → metadata + lyrics. The code string is the user message verbatim; blank codes ask
    the model for a random song (``NO USER INPUT``)."""
    return _task_prompt(UNDERSTAND_INSTRUCTION, audio_codes if audio_codes.strip() else NO_USER_INPUT)


def create_sample_prompt(query: str, is_instrumental: bool) -> ChatPrompt:
    """Natural-language query → full sample (``create_sample``); a blank query becomes ``NO USER INPUT``."""
    query = query if query.strip() else NO_USER_INPUT
    return _task_prompt(CREATE_SAMPLE_INSTRUCTION, f"{query}\n\ninstrumental: {'true' if is_instrumental else 'false'}")


def format_sample_prompt(caption: str, lyrics: str) -> ChatPrompt:
    """Caption + lyrics → enhanced sample (``format_sample``); no trailing newline, unlike phase 1.

    A blank caption becomes ``NO USER INPUT``, blank lyrics ``[Instrumental]``.
    """
    caption = caption if caption.strip() else NO_USER_INPUT
    lyrics = lyrics if lyrics.strip() else INSTRUMENTAL_LYRICS
    return _task_prompt(FORMAT_SAMPLE_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}")


def unconditional_task_prompt(instruction: str, negative_prompt: str = NO_USER_INPUT) -> ChatPrompt:
    """CFG branch of the understand / create_sample / format_sample prompts (unused by default:
    those tasks run without CFG). The user message is the negative prompt, or empty when blank."""
    return _task_prompt(instruction, negative_prompt if negative_prompt and negative_prompt.strip() else "")
