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
