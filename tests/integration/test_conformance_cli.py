"""``acestep-conformance ../shared/golden`` passes every tensor case, every prompt vector and every LM
generation case on both LM backends; a broken vector fails it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.mark.vllm
def test_conformance_command_passes_all_cases() -> None:
    completed = subprocess.run([sys.executable, "-m", "conformance.cli", str(GOLDEN)], cwd=REPO,
                               capture_output=True, text=True, timeout=1500)
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    summary = re.fullmatch(r"(\d+) passed, (\d+) failed", lines[-1])
    assert summary and summary.group(2) == "0"
    tensor_cases = [c["name"] for c in json.loads((GOLDEN / "manifest.json").read_text())["cases"]]
    prompt_vectors = sum(len(v) for v in json.loads((GOLDEN / "prompts.json").read_text()).values()
                         if isinstance(v, list))
    lm_cases = [c["name"] for c in json.loads((GOLDEN / "lm" / "manifest.json").read_text())["cases"]]
    assert len(tensor_cases) == 18 and len(lm_cases) == 31
    assert int(summary.group(1)) == len(tensor_cases) + prompt_vectors + 2 * len(lm_cases)
    passed = {line.split()[0] for line in lines if " PASS " in line}
    assert set(tensor_cases) <= passed
    assert {f"lm:{backend}:{name}" for backend in ("transformers", "vllm") for name in lm_cases} <= passed


def test_conformance_command_reports_an_lm_difference(tmp_path: Path) -> None:
    """One LM case whose expected generated ids were altered: that case fails, naming the step."""
    vectors = tmp_path / "vectors"
    shutil.copytree(GOLDEN / "lm" / "checkpoint", vectors / "lm" / "checkpoint")
    manifest = json.loads((GOLDEN / "lm" / "manifest.json").read_text())
    manifest["cases"] = [c for c in manifest["cases"] if c["name"] == "cot_user_bpm"]
    (vectors / "lm" / "manifest.json").write_text(json.dumps(manifest))
    case = json.loads((GOLDEN / "lm" / "cases" / "cot_user_bpm" / "case.json").read_text())
    case["phases"][0]["generated_ids"][20] += 1
    (vectors / "lm" / "cases" / "cot_user_bpm").mkdir(parents=True)
    (vectors / "lm" / "cases" / "cot_user_bpm" / "case.json").write_text(json.dumps(case))
    completed = subprocess.run([sys.executable, "-m", "conformance.cli", str(vectors), "--lm-backend", "transformers"],
                               cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert lines[-1] == "0 passed, 1 failed"
    assert "lm:transformers:cot_user_bpm" in lines[0] and "FAIL" in lines[0] and "step 20" in lines[0]


def test_conformance_command_fails_on_a_broken_vector(tmp_path: Path) -> None:
    broken = tmp_path / "vectors"
    broken.mkdir()
    prompts = json.loads((GOLDEN / "prompts.json").read_text())
    first = prompts["lyrics"][0]
    for key, value in first.items():
        if isinstance(value, str) and "# Lyric" in value:
            first[key] = value.replace("# Lyric", "# Lyrics")
    (broken / "prompts.json").write_text(json.dumps(prompts))
    completed = subprocess.run([sys.executable, "-m", "conformance.cli", str(broken)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert re.search(r"^\d+ passed, [1-9]\d* failed$", completed.stdout.strip().splitlines()[-1])
