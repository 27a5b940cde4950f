"""The user-facing clients against the session stack: the SDK Quick Start example and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from shared.constants import NUM_CHANNELS, SAMPLE_RATE_HZ
from tests.e2e.helpers import decode_file

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = REPO_ROOT / "examples" / "quickstart.py"
CLI = Path(sys.executable).parent / "acestep"


def _run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _assert_song(path: Path, container: str, duration_s: float) -> None:
    waveform, rate, found = decode_file(path.read_bytes())
    assert (found, rate) == (container, SAMPLE_RATE_HZ)
    assert waveform.shape == (NUM_CHANNELS, round(duration_s * SAMPLE_RATE_HZ))


def test_quickstart_example(address: str, tmp_path: Path) -> None:
    out = _run([sys.executable, str(QUICKSTART), address, str(tmp_path)])

    blocks = re.findall(r"Generated: (.+)\nKey: (.+)\nSeed: (\d+)\n", out)
    assert len(blocks) == 2, out  # batch_size=2
    for path_text, key, seed in blocks:
        path = Path(path_text)
        assert path.parent == tmp_path and path.name == f"{key}.flac"
        _assert_song(path, "FLAC", 30.0)
        assert 0 <= int(seed) < 2**32
    assert len({key for _, key, _ in blocks}) == 2 and len({seed for _, _, seed in blocks}) == 2


def test_cli_generate_writes_the_file(address: str, tmp_path: Path) -> None:
    out = _run([str(CLI), "generate", "--gateway", address, "--caption", "minimal techno groove",
                "--duration", "10", "--out", str(tmp_path), "--no-thinking", "--format", "wav", "--seed", "9"])

    [line] = [line for line in out.splitlines() if line.endswith("seed=9")]
    path = Path(line.split()[0])
    assert path.parent == tmp_path and path.suffix == ".wav"
    _assert_song(path, "WAV", 10.0)


def test_cli_lm_helpers_print_their_results(address: str, tmp_path: Path) -> None:
    """understand, create-sample and format-sample print the documented result as JSON."""
    import json

    understood = json.loads(_run([str(CLI), "understand", "--gateway", address, "--codes",
                                  "<|audio_code_5|><|audio_code_77|>" * 20, "--temperature", "0.3"]))
    created = json.loads(_run([str(CLI), "create-sample", "--gateway", address, "--query", "a calm lullaby",
                               "--instrumental", "--language", "en"]))
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({"bpm": 95, "duration": 40}))
    formatted = json.loads(_run([str(CLI), "format-sample", "--gateway", address, "--caption", "latin pop",
                                 "--lyrics", "[Verse 1]\nBailando", "--user-metadata", str(metadata)]))
    for result in (understood, created, formatted):
        assert result["success"] is True and result["error"] is None
        assert 30 <= result["bpm"] <= 300  # the constrained CoT always starts with bpm
    assert created["instrumental"] is True
    # the user's bpm is written verbatim (bpm comes before the caption; the reference's decoder can
    # jump over later fields, user values included, when the free text after the caption names one)
    assert formatted["bpm"] == 95
