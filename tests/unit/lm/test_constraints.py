"""Constrained decoding of the 5 Hz LM, driven with the tiny LM tokenizer.

Most tests run the constraint the way an engine does (mask, sample, advance) with hostile logits,
in the strict mode (``--lm-strict-cot``), whose tightenings guarantee a well-formed block:
random scores plus large boosts on tokens the block must not contain (EOS, ``</think>``, audio
codes, backticks, padded ids, ...). The produced ids are decoded and the text is checked line by line.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from lm_service.constraints import CAPTION_TOKEN_LIMIT, ConstraintSpec, ConstraintVocab, build_constraint
from lm_service.constraints.codes import CodesConstraint
from lm_service.constraints.metadata_fsm import MetadataConstraint
from lm_service.constraints.tables import TokenMask
from lm_service.constraints.vocab import BUILTIN_GENRES_PATH, find_code_id_range
from lm_service.output_parser import parse_lm_output
from shared.constants import KEYSCALES, NUM_AUDIO_CODES, VALID_LANGUAGES, VALID_TIME_SIGNATURES
from shared.errors import Internal, InvalidArgument
from devtools.tiny_checkpoints import build_lm_tokenizer

MAX_DURATION_S = 240
NUM_PADDED = 48


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Masking one row takes microseconds; on a busy small machine torch's thread pool only adds waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_lm_tokenizer(tmp_path_factory.mktemp("lm_tokenizer"))


@pytest.fixture(scope="session")
def vocab(tokenizer) -> ConstraintVocab:
    return ConstraintVocab.from_tokenizer(tokenizer, max_duration_s=MAX_DURATION_S, genres_path=BUILTIN_GENRES_PATH)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


class Adversary:
    """Random logits with large boosts on the tokens a well-formed block must not contain."""

    def __init__(self, tokenizer, vocab: ConstraintVocab, width: int, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._width, self._num_tokens, self._code_start = width, vocab.num_tokens, vocab.code_start_id
        self._bank = (self._rng.standard_normal(4 * width) * 4.0).astype(np.float32)  # [4W]
        self._gumbel = self._rng.gumbel(size=4 * width).astype(np.float32)  # [4W]
        hostile = [vocab.eos_id, vocab.pad_id, vocab.newline_id, vocab.backtick_id, *vocab.think_end_ids]
        hostile += tokenizer.convert_tokens_to_ids(["<|im_start|>", "<think>"])
        words = ["duration", "bpm", "d", ":", "x", "pop", "C", "1", "`", "<"]
        hostile += [i for word in words for i in encode(tokenizer, word)]
        self._hostile = sorted(set(hostile))
        indented = [" ", "  ", "\t", " rock", " en", " 9", " warm"]
        self._indented = sorted({encode(tokenizer, word)[0] for word in indented})

    def logits(self) -> torch.Tensor:
        """Fresh logits ([W]) with 0 to 3 boosted ids."""
        offset = int(self._rng.integers(0, 3 * self._width))
        logits = self._bank[offset:offset + self._width].copy()  # [W]
        for _ in range(int(self._rng.integers(0, 4))):
            logits[self._pick()] += self._rng.random() * 60.0
        return torch.from_numpy(logits)

    def sample(self, masked: torch.Tensor) -> int:
        """Gumbel-max sample of the masked logits ([W])."""
        offset = int(self._rng.integers(0, 3 * self._width))
        return int(np.argmax(masked.numpy() + self._gumbel[offset:offset + self._width]))

    def _pick(self) -> int:
        kind = int(self._rng.integers(0, 5))
        if kind == 0:
            return int(self._rng.integers(self._code_start, self._code_start + NUM_AUDIO_CODES))
        if kind == 1 and self._width > self._num_tokens:
            return int(self._rng.integers(self._num_tokens, self._width))
        pool = self._indented if kind == 4 else self._hostile
        return pool[int(self._rng.integers(0, len(pool)))]


def drive(constraint, vocab, logits_fn, sample_fn, max_steps: int = 4000) -> list[int]:
    """Run mask -> sample -> advance until the constraint is finished; check every mask."""
    produced = []
    for _ in range(max_steps):
        if constraint.is_finished:
            return produced
        masked = constraint.mask_logits(logits_fn())
        assert np.isneginf(masked.numpy()[vocab.num_tokens:]).all(), "a padded id was allowed"
        token = sample_fn(masked)
        assert np.isfinite(masked[token].item()), "a step allowed no token at all"
        constraint.advance(token)
        produced.append(token)
    raise AssertionError(f"not finished after {max_steps} steps")


def run_adversarial(tokenizer, vocab, spec, seed, prompt=(), width=None) -> list[int]:
    adversary = Adversary(tokenizer, vocab, width or vocab.num_tokens + NUM_PADDED, seed)
    return drive(build_constraint(vocab, spec, prompt), vocab, adversary.logits, adversary.sample)


def expected_fields(spec: ConstraintSpec) -> list[str]:
    order = ["bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature"]
    return [name for name in order if not spec.is_skipped(name)]


def split_block(text: str, stop_at_reasoning: bool) -> tuple[list[str], str]:
    """Lines of the CoT block and the text after it; checks how the block starts and ends."""
    assert text.startswith("<think>\n"), text[:40]
    if stop_at_reasoning:  # phase 1 ends with EOS where `</think>` would come
        assert text.endswith("\n<|im_end|>"), text[-40:]
        return text[len("<think>\n"):-len("\n<|im_end|>")].split("\n"), ""
    body, closed, rest = text[len("<think>\n"):].partition("\n</think>")
    assert closed, text
    return body.split("\n"), rest


def read_fields(lines: list[str]) -> list[tuple[str, str]]:
    """``(name, raw value)`` per top-level line; only the caption may have continuation lines."""
    fields: list[tuple[str, str]] = []
    for line in lines:
        if fields and fields[-1][0] == "caption" and (line == "" or line[0] in " \t"):
            fields[-1] = ("caption", fields[-1][1] + "\n" + line)
            continue
        name, colon, value = line.partition(":")
        assert colon and name and name == name.strip(), f"not a field line: {line!r}"
        fields.append((name, value))
    return fields


def check_values(fields: dict[str, str], vocab: ConstraintVocab) -> None:
    """Every generated value has the reference's format and range."""
    if "bpm" in fields:
        assert re.fullmatch(r" \d+", fields["bpm"]) and 30 <= int(fields["bpm"]) <= 300, fields["bpm"]
    if "duration" in fields:
        assert re.fullmatch(r" \d+", fields["duration"]), fields["duration"]
        assert 10 <= int(fields["duration"]) <= MAX_DURATION_S
    if "keyscale" in fields:
        assert fields["keyscale"][0] == " " and fields["keyscale"][1:] in KEYSCALES, fields["keyscale"]
    if "language" in fields:
        assert fields["language"][0] == " " and fields["language"][1:] in VALID_LANGUAGES, fields["language"]
    if "timesignature" in fields:
        assert fields["timesignature"][0] == " " and fields["timesignature"][1:] in VALID_TIME_SIGNATURES
    if "genres" in fields:
        assert fields["genres"].lower() in vocab.genres.genres, fields["genres"]
    if "caption" in fields:
        assert "`" not in fields["caption"] and "<|audio_code_" not in fields["caption"]


def check_cot(text: str, spec: ConstraintSpec, vocab: ConstraintVocab, check_ranges: bool = True) -> dict[str, str]:
    """Field order, block ending and (unless values were user-forced) every value's format.

    Returns the raw value text per field (everything after ``name:``, continuation lines included).
    """
    lines, rest = split_block(text, spec.stop_at_reasoning)
    fields = read_fields(lines)
    assert [name for name, _ in fields] == expected_fields(spec)
    assert "<|audio_code_" not in rest
    values = dict(fields)
    if check_ranges:
        check_values(values, vocab)
        parsed = parse_lm_output(text).metadata
        assert {k: parsed[k] for k in values if k in ("bpm", "duration")} == {
            k: int(v) for k, v in values.items() if k in ("bpm", "duration")}
        assert {k: parsed[k] for k in values if k in ("keyscale", "language", "timesignature")} == {
            k: v.strip() for k, v in values.items() if k in ("keyscale", "language", "timesignature")}
    return values


@pytest.mark.parametrize("skip_caption", [False, True])
@pytest.mark.parametrize("skip_language", [False, True])
def test_cot_phase_under_hostile_logits_is_well_formed(tokenizer, vocab, skip_caption, skip_language):
    spec = ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True, skip_genres=True,
                          skip_caption=skip_caption, skip_language=skip_language)
    num_folded_captions = 0
    for seed in range(16):
        ids = run_adversarial(tokenizer, vocab, spec, seed)
        assert ids[-1] == vocab.eos_id and ids.count(vocab.eos_id) == 1
        assert vocab.think_end_ids[0] not in ids
        values = check_cot(tokenizer.decode(ids), spec, vocab)
        num_folded_captions += "\n" in values.get("caption", "")
    if not skip_caption:  # the hostile logits did reach the caption's continuation-line branch
        assert num_folded_captions > 0


def test_understand_phase_under_hostile_logits_is_well_formed(tokenizer, vocab):
    spec = ConstraintSpec(strict=True, phase="understand", skip_genres=False)
    genres = set()
    for seed in range(16):
        ids = run_adversarial(tokenizer, vocab, spec, seed)
        values = check_cot(tokenizer.decode(ids), spec, vocab)
        assert ids[-1] in vocab.stop_ids
        genres.add(values["genres"].lower())
    assert len(genres) > 8


@pytest.mark.parametrize("seed", range(6))
def test_codes_phase_yields_exactly_target_codes_then_eos(tokenizer, vocab, seed):
    prompt = encode(tokenizer, "<|im_start|>assistant\n<think>\nbpm: 120\n</think>\n\n<|im_end|>\n")
    target = 20 + 7 * seed
    spec = ConstraintSpec(phase="codes", target_codes=target)
    constraint = build_constraint(vocab, spec, prompt)
    assert isinstance(constraint, CodesConstraint)
    adversary = Adversary(tokenizer, vocab, vocab.num_tokens + NUM_PADDED, seed)
    ids = drive(constraint, vocab, adversary.logits, adversary.sample)
    assert len(ids) == target + 1 and ids[-1] == vocab.eos_id
    assert all(vocab.code_start_id <= i < vocab.code_end_id for i in ids[:-1])
    assert len(re.findall(r"<\|audio_code_(\d+)\|>", tokenizer.decode(ids))) == target


def test_codes_phase_without_target_allows_only_codes_and_eos_at_any_step(tokenizer, vocab):
    constraint = build_constraint(vocab, ConstraintSpec(phase="codes"), encode(tokenizer, "</think>"))
    masked = constraint.mask_logits(torch.zeros(vocab.num_tokens + NUM_PADDED))
    allowed = torch.isfinite(masked).nonzero().flatten()
    assert allowed.tolist() == [vocab.eos_id] + list(range(vocab.code_start_id, vocab.code_end_id))
    constraint.advance(vocab.code_start_id + 5)
    assert not constraint.is_finished
    constraint.mask_logits(torch.zeros(vocab.num_tokens))
    constraint.advance(vocab.eos_id)
    assert constraint.is_finished


def _window_allows(window) -> list[int]:
    ids = window.ids if window.blocked is None else window.ids[~window.blocked]
    return ids.tolist()


def _row_allows(constraint, vocab: ConstraintVocab) -> list[int]:
    logits = torch.randn(vocab.num_tokens + NUM_PADDED, generator=torch.Generator().manual_seed(0))
    return torch.isfinite(constraint.mask_logits(logits)).nonzero().flatten().tolist()


@pytest.mark.parametrize("target", [None, 3])
def test_the_codes_window_allows_exactly_what_the_mask_allows_at_every_step(tokenizer, vocab, target):
    """The engine decides codes-phase rows inside the window (and may compute only its head rows)."""
    constraint = build_constraint(vocab, ConstraintSpec(phase="codes", target_codes=target), encode(tokenizer, "</think>"))
    windows = set()
    for step in range(5):
        window = constraint.allowed_window()
        windows.add(id(window.ids))
        assert _window_allows(window) == _row_allows(constraint, vocab), f"step {step}"
        constraint.advance(vocab.code_start_id + step)
    assert len(windows) == 1  # one window tensor for the whole phase: requests batch together
    assert window.ids.tolist() == [vocab.eos_id] + list(range(vocab.code_start_id, vocab.code_end_id))
    debug = build_constraint(vocab, ConstraintSpec(phase="codes", debug=True), encode(tokenizer, "</think>"))
    assert debug.allowed_window() is None  # debug logging needs mask_logits at every step


def test_the_metadata_machine_declares_the_codes_window_only_in_the_codes_state(tokenizer, vocab):
    spec = ConstraintSpec(phase="codes", target_codes=4, skip_caption=True, skip_language=True)
    constraint = build_constraint(vocab, spec, encode(tokenizer, "<|im_start|>assistant\n"))
    assert isinstance(constraint, MetadataConstraint) and constraint.allowed_window() is None
    for token in encode(tokenizer, "<think>\nbpm: 120\nduration: 30\nkeyscale: C major\ntimesignature: 4\n</think>"):
        constraint.mask_logits(torch.zeros(vocab.num_tokens))
        constraint.advance(token)
    assert constraint.state_name == "CODES_GENERATION"
    assert _window_allows(constraint.allowed_window()) == _row_allows(constraint, vocab)


def test_codes_phase_prompt_without_think_end_writes_the_cot_first(tokenizer, vocab):
    spec = ConstraintSpec(phase="codes", target_codes=152, skip_caption=True, skip_language=True)
    ids = run_adversarial(tokenizer, vocab, spec, seed=3, prompt=encode(tokenizer, "<|im_start|>assistant\n"))
    text = tokenizer.decode(ids)
    block, _, codes = text.partition("</think>")
    # Reference quirk: a target forces the duration digits (152 codes -> 30 s), without a space.
    assert "\nduration:30\n" in block
    assert len(re.findall(r"<\|audio_code_\d+\|>", codes)) == 152 and codes.endswith("<|im_end|>")
    lines = block[len("<think>\n"):].rstrip("\n").split("\n")
    assert [name for name, _ in read_fields(lines)] == ["bpm", "duration", "keyscale", "timesignature"]


@pytest.mark.parametrize("seed", range(4))
def test_user_metadata_is_forced_verbatim(tokenizer, vocab, seed):
    user = {"bpm": 97, "duration": 45, "keyscale": "C Major", "timesignature": "4/4", "language": "pt"}
    spec = ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True, user_metadata=user)
    ids = run_adversarial(tokenizer, vocab, spec, seed)
    text = tokenizer.decode(ids)
    values = check_cot(text, spec, vocab, check_ranges=False)
    for name, value in user.items():
        assert values[name] == f" {value}", name
        assert f"\n{name}: {value}\n" in text
    check_values({"caption": values["caption"]}, vocab)


def test_user_caption_and_genres_are_forced_in_understand_phase(tokenizer, vocab):
    user = {"caption": "Soft piano, warm strings.", "genres": "Dream Pop"}
    spec = ConstraintSpec(strict=True, phase="understand", skip_genres=False, user_metadata=user)
    text = tokenizer.decode(run_adversarial(tokenizer, vocab, spec, seed=11))
    values = check_cot(text, spec, vocab, check_ranges=False)
    assert values["caption"] == " Soft piano, warm strings." and values["genres"] == " Dream Pop"
    check_values({k: v for k, v in values.items() if k not in user}, vocab)


def test_injected_tokens_are_the_only_allowed_ones(tokenizer, vocab):
    spec = ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True, user_metadata={"bpm": 128})
    constraint = build_constraint(vocab, spec, [])
    for token in encode(tokenizer, "<think>\nbpm:"):
        constraint.mask_logits(torch.zeros(vocab.num_tokens))
        constraint.advance(token)
    for token in encode(tokenizer, " 128\n"):
        masked = constraint.mask_logits(torch.randn(vocab.num_tokens))
        assert torch.isfinite(masked).nonzero().flatten().tolist() == [token]
        constraint.advance(token)
    assert constraint.state_name == "CAPTION_NAME"


@pytest.mark.parametrize("seed", range(3))
def test_skipped_fields_never_appear(tokenizer, vocab, seed):
    spec = ConstraintSpec(strict=True, phase="understand", skip_genres=True, skip_caption=True, skip_language=True,
                          user_metadata={"language": "en", "caption": "never written", "genres": "rock"})
    text = tokenizer.decode(run_adversarial(tokenizer, vocab, spec, seed))
    block = text.partition("</think>")[0]
    for name in ("caption", "genres", "language"):
        assert f"\n{name}:" not in block
    assert "never written" not in text
    check_cot(text, spec, vocab)


def _advance_text(constraint, tokenizer, vocab, text: str) -> None:
    for token in encode(tokenizer, text):
        masked = constraint.mask_logits(torch.zeros(vocab.num_tokens))
        assert torch.isfinite(masked[token]), (text, tokenizer.decode([token]))
        constraint.advance(token)


def _caption_constraint(tokenizer, vocab):
    constraint = build_constraint(vocab, ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True), [])
    _advance_text(constraint, tokenizer, vocab, "<think>\nbpm: 90\ncaption:")
    assert constraint.state_name == "CAPTION_VALUE"
    return constraint


@pytest.mark.parametrize("favourite", ["x", " "])
def test_caption_is_cut_at_the_token_limit(tokenizer, vocab, favourite):
    constraint = _caption_constraint(tokenizer, vocab)
    token = encode(tokenizer, favourite)[0]
    caption = []
    while constraint.state_name == "CAPTION_VALUE" and len(caption) < 2 * CAPTION_TOKEN_LIMIT:
        logits = torch.zeros(vocab.num_tokens)
        logits[token] = 100.0
        chosen = int(torch.argmax(constraint.mask_logits(logits)))
        constraint.advance(chosen)
        caption.append(chosen)
    assert caption[:CAPTION_TOKEN_LIMIT] == [token] * CAPTION_TOKEN_LIMIT
    assert caption[CAPTION_TOKEN_LIMIT] == vocab.newline_id
    assert tokenizer.decode(caption[CAPTION_TOKEN_LIMIT + 1:]) == "duration:"
    assert constraint.state_name == "DURATION_VALUE"


def test_caption_end_is_decided_by_the_top_token_after_a_line_break(tokenizer, vocab):
    constraint = _caption_constraint(tokenizer, vocab)
    _advance_text(constraint, tokenizer, vocab, " warm pads\n")
    logits = torch.zeros(vocab.num_tokens)
    logits[encode(tokenizer, "  ")[0]] = 5.0  # an indented continuation is the top token
    allowed = torch.isfinite(constraint.mask_logits(logits)).nonzero().flatten().tolist()
    assert allowed and all(vocab.token_texts[i][0] in " \t" for i in allowed)
    _advance_text(constraint, tokenizer, vocab, " and drums.\n")
    logits = torch.zeros(vocab.num_tokens)
    logits[encode(tokenizer, "x")[0]] = 5.0  # an unindented token is the top token: the caption ends
    allowed = torch.isfinite(constraint.mask_logits(logits)).nonzero().flatten().tolist()
    assert {vocab.token_texts[i] for i in allowed} <= {"duration:"[:end] for end in range(1, 10)}
    assert encode(tokenizer, "duration")[0] in allowed
    _advance_text(constraint, tokenizer, vocab, "duration:")
    assert constraint.state_name == "DURATION_VALUE"


def test_language_first_token_is_the_top_candidate_not_a_sample(tokenizer, vocab):
    spec = ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True, skip_caption=True)
    constraint = build_constraint(vocab, spec, [])
    _advance_text(constraint, tokenizer, vocab, "<think>\nbpm: 90\nduration: 60\nkeyscale: A minor\nlanguage:")
    candidates = vocab.language.node(()).allowed
    logits = torch.full((vocab.num_tokens,), -5.0)
    logits[candidates] = torch.linspace(0.0, 1.0, len(candidates))
    best = int(candidates[-1])
    logits[vocab.eos_id] = 50.0  # not a candidate: ignored
    allowed = torch.isfinite(constraint.mask_logits(logits)).nonzero().flatten().tolist()
    assert allowed == [best]


@pytest.mark.parametrize("field,values", [
    ("bpm", [str(v) for v in range(30, 301)]),
    ("duration", [str(v) for v in range(10, MAX_DURATION_S + 1)]),
])
def test_numeric_values_follow_the_value_range(tokenizer, vocab, field, values):
    trie, context = getattr(vocab, field), len(encode(tokenizer, f"{field}:"))
    for written in sorted({v[:cut] for v in values for cut in range(len(v) + 1)}):
        key = tuple(encode(tokenizer, f"{field}: {written}")[context:]) if written else ()
        node = trie.node(key)
        assert node is not None, written
        nexts = {v[len(written)] for v in values if v.startswith(written) and len(v) > len(written)}
        expected = {encode(tokenizer, f"{field}: {written}{d}")[context + len(key)] for d in nexts}
        if written in values:
            expected.add(vocab.newline_id)
        assert set(node.allowed.tolist()) == expected, written


def test_fixed_strings_use_the_longest_single_token_prefix(tokenizer, vocab):
    for text in ["<think>", "</think>", "keyscale:", "timesignature:", "caption:"]:
        table, position, tokens = vocab.fixed[text], 0, []
        while table.allowed(position) is not None:
            allowed = table.allowed(position).tolist()
            remaining = text[position:]
            longest = next(end for end in range(len(remaining), 0, -1) if len(encode(tokenizer, remaining[:end])) == 1)
            assert allowed == encode(tokenizer, remaining[:longest])
            tokens.append(allowed[0])
            position += len(vocab.token_texts[allowed[0]])
        assert tokenizer.decode(tokens) == text
    assert vocab.fixed["<think>"].allowed(0).tolist() == tokenizer.convert_tokens_to_ids(["<think>"])


def test_vocab_tables_match_the_tokenizer(tokenizer, vocab):
    assert vocab.code_start_id == tokenizer.convert_tokens_to_ids("<|audio_code_0|>")
    assert vocab.code_end_id - vocab.code_start_id == NUM_AUDIO_CODES
    assert vocab.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert vocab.think_end_ids == tuple(tokenizer.convert_tokens_to_ids(["</think>"]))
    assert sorted(vocab.keyscale.values) == sorted(KEYSCALES)
    assert sorted(vocab.language.values) == sorted(VALID_LANGUAGES)
    assert len(vocab.genres.genres) >= 200 and all(g == g.lower().strip() for g in vocab.genres.genres)


@pytest.mark.parametrize("blocked_share", [0.05, 0.99])
def test_token_masks_block_exactly_their_ids_in_both_forms(vocab, blocked_share):
    gen = torch.Generator().manual_seed(5)
    blocked = torch.rand(vocab.num_tokens, generator=gen) < blocked_share  # [N]
    mask = TokenMask.from_blocked(blocked)
    assert (mask.ceiling is None) == (blocked_share > 0.5)
    logits = torch.randn(vocab.num_tokens + NUM_PADDED, generator=gen)  # [V]
    logits[:10] = float("inf")
    expected = logits.clone()
    expected[: vocab.num_tokens][blocked] = float("-inf")
    expected[vocab.num_tokens:] = float("-inf")
    assert torch.equal(vocab.apply(mask, logits), expected)


def test_code_range_must_be_complete_and_contiguous():
    texts = ["a", "b"] + [f"<|audio_code_{n}|>" for n in range(8)]
    assert find_code_id_range(texts, num_codes=8) == 2
    with pytest.raises(Internal):
        find_code_id_range(texts[:-1], num_codes=8)
    swapped = texts[:3] + [texts[4], texts[3]] + texts[5:]
    with pytest.raises(Internal):
        find_code_id_range(swapped, num_codes=8)


@pytest.mark.parametrize("spec", [
    ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True),
    ConstraintSpec(strict=True, phase="understand", skip_genres=False),
    ConstraintSpec(phase="codes", target_codes=30),
])
def test_padded_vocab_ids_are_never_allowed(tokenizer, vocab, spec):
    prompt = encode(tokenizer, "</think>") if spec.phase == "codes" else []
    ids = run_adversarial(tokenizer, vocab, spec, seed=7, prompt=prompt, width=vocab.num_tokens + 1000)
    assert max(ids) < vocab.num_tokens


def test_debug_logs_transitions_and_choices(tokenizer, vocab, caplog):
    spec = ConstraintSpec(strict=True, phase="cot", stop_at_reasoning=True, debug=True)
    with caplog.at_level(logging.DEBUG, logger="lm_service.constraints"):
        run_adversarial(tokenizer, vocab, spec, seed=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "lm_service.constraints"]
    assert "FSM transition: THINK_TAG -> NEWLINE_AFTER_THINK" in messages
    assert "FSM transition: TIMESIG_VALUE -> THINK_END_TAG" in messages
    assert any(m.startswith("language: top-1 first token") for m in messages)
    assert any(m.startswith("BPM_VALUE: ") and " allowed: " in m for m in messages)


def test_spec_and_vocab_reject_bad_arguments(tokenizer):
    with pytest.raises(InvalidArgument, match="phase"):
        ConstraintSpec(phase="lyrics")
    with pytest.raises(InvalidArgument, match="unknown fields"):
        ConstraintSpec(user_metadata={"tempo": 120})
    with pytest.raises(InvalidArgument, match=r"max_duration_s must be in \[10, 600\] seconds"):
        ConstraintVocab.from_tokenizer(tokenizer, max_duration_s=900)


@pytest.mark.parametrize("phase", ["cot", "codes"])
def test_logits_narrower_than_the_tokenizer_are_refused(tokenizer, vocab, phase):
    constraint = build_constraint(vocab, ConstraintSpec(phase=phase), encode(tokenizer, "</think>"))
    with pytest.raises(Internal, match="logits have"):
        constraint.mask_logits(torch.zeros(vocab.num_tokens - 1))


def test_build_constraint_picks_the_state_machine_for_metadata_phases(tokenizer, vocab):
    think_end = encode(tokenizer, "</think>")
    assert isinstance(build_constraint(vocab, ConstraintSpec(strict=True, phase="cot"), think_end), MetadataConstraint)
    assert isinstance(build_constraint(vocab, ConstraintSpec(strict=True, phase="understand"), think_end), MetadataConstraint)
    assert isinstance(build_constraint(vocab, ConstraintSpec(phase="codes"), think_end), CodesConstraint)
