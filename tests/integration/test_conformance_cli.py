"""``acestep-conformance ../shared/golden`` passes every tensor case and every prompt vector."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO.parent / "shared" / "golden"


def test_conformance_command_passes_all_cases() -> None:
    completed = subprocess.run([sys.executable, "-m", "shared.conformance", str(GOLDEN)], cwd=REPO,
                               capture_output=True, text=True, timeout=900)
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    summary = re.fullmatch(r"(\d+) passed, (\d+) failed", lines[-1])
    assert summary and summary.group(2) == "0"
    tensor_cases = [c["name"] for c in json.loads((GOLDEN / "manifest.json").read_text())["cases"]]
    prompt_vectors = sum(len(v) for v in json.loads((GOLDEN / "prompts.json").read_text()).values()
                         if isinstance(v, list))
    assert len(tensor_cases) == 18
    assert int(summary.group(1)) == len(tensor_cases) + prompt_vectors
    passed = {line.split()[0] for line in lines if " PASS " in line}
    assert set(tensor_cases) <= passed


def test_conformance_command_fails_on_a_broken_vector(tmp_path: Path) -> None:
    broken = tmp_path / "vectors"
    broken.mkdir()
    prompts = json.loads((GOLDEN / "prompts.json").read_text())
    first = prompts["lyrics"][0]
    for key, value in first.items():
        if isinstance(value, str) and "# Lyric" in value:
            first[key] = value.replace("# Lyric", "# Lyrics")
    (broken / "prompts.json").write_text(json.dumps(prompts))
    completed = subprocess.run([sys.executable, "-m", "shared.conformance", str(broken)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert re.search(r"^\d+ passed, [1-9]\d* failed$", completed.stdout.strip().splitlines()[-1])
