"""What a ``bench-gpu`` run measures (``BenchSpec``) and what a section reports (``Line``, ``SectionResult``).

Each section runs in its own process (GPU memory figures and failures stay per section): the
orchestrator writes the spec as JSON, runs ``python -m devtools.bench_gpu.<section> SPEC RESULT``
and reads the result JSON back.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

CAPTION = "An upbeat synth-pop track with a bright female vocal and a steady four-on-the-floor beat."
LYRICS = ("[Verse]\nNeon lights are calling, calling out your name\nEvery street is shining in the rain\n"
          "[Chorus]\nSing it loud tonight, we run into the light\n")
# Every metadata field fixed: the LM skips its chain of thought (phase 1) and plans the codes only,
# the same work in our stack and in the reference.
METADATA = {"bpm": 120, "keyscale": "A minor", "timesignature": "4", "language": "en"}

DIT_STAGES = "DiT stages"
DIT_THROUGHPUT = "DiT throughput"
LM = "LM codes"
FIRST_PCM = "first PCM chunk"
END_TO_END = "end to end"
MEMORY = "memory"


@dataclass(frozen=True)
class BenchSpec:
    """One run's workload; the same spec drives our sections and the reference's."""

    device: str                        # "cuda" or "cpu"
    size: str                          # "published" or "tiny"
    checkpoints: str                   # checkpoint root in the published layout
    lm_model: str                      # LM folder under ``checkpoints``
    dit_model: str = "acestep-v15-turbo"
    durations_s: tuple[float, ...] = (30.0, 120.0, 240.0)
    batches: tuple[int, ...] = (1, 8)
    lm_codes: int = 100                # audio codes per plan (5 per second of audio)
    lm_concurrency: tuple[int, ...] = (1, 16)
    lm_cfg_scales: tuple[float, ...] = (1.0, 2.0)
    stack_requests: int = 16
    stack_duration_s: float = 30.0
    reference_dir: str = ".reference/ACE-Step-1.5"
    reference_model_code: str = ""     # folder with the reference's DiT modeling files, if not in the checkout
    reference_requests: int = 4        # full requests the reference runs one after another
    reference_lm_concurrency: tuple[int, ...] = ()  # plans at once on the reference LM; () = lm_concurrency
    work_dir: str = ""                 # scratch space of the sections

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BenchSpec":
        data = json.loads(text)
        for name in ("durations_s", "batches", "lm_concurrency", "lm_cfg_scales", "reference_lm_concurrency"):
            data[name] = tuple(data[name])
        return cls(**data)


@dataclass
class Line:
    """One figure: ours, the reference's, or both (matched on ``key``)."""

    group: str
    workload: str
    metric: str
    ours: Optional[float] = None
    reference: Optional[float] = None
    note: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.group, self.workload, self.metric


@dataclass
class SectionResult:
    """A section's lines, free-text notes (backend, attention path ...) and, per group, why the
    section could not measure it (``unavailable``)."""

    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    sink: Optional[Path] = field(default=None, repr=False, compare=False)  # rewritten after every line

    def put(self, line: Line) -> None:
        """Keep ``line`` (and write the result so far to ``sink``: a section stopped at its time limit
        still reports what it measured)."""
        self.lines.append(line)
        self.flush()

    def add(self, group: str, workload: str, metric: str, value: Optional[float], note: str = "") -> None:
        self.put(Line(group, workload, metric, ours=value, note=note))

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        return json.dumps({"lines": [asdict(line) for line in self.lines], "notes": self.notes,
                           "unavailable": self.unavailable}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SectionResult":
        data = json.loads(text)
        return cls([Line(**line) for line in data["lines"]], list(data["notes"]), dict(data["unavailable"]))


def stage_workload(duration_s: float, batch: int) -> str:
    return f"{duration_s:g} s song, batch {batch}"


def memory_metric(is_cuda: bool) -> str:
    return "peak GPU memory GiB" if is_cuda else "peak RSS GiB (cpu)"


def peak_host_rss_gib() -> float:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def section_main(run: Callable[[BenchSpec, SectionResult], None], argv: Optional[list[str]] = None) -> int:
    """``python -m devtools.bench_gpu.<section> SPEC.json RESULT.json``: run, writing lines as they come.

    An exception is written to stderr and the exit status is 1; the orchestrator reports it (with
    the lines written before it).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m devtools.bench_gpu.<section> SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = BenchSpec.from_json(Path(args[0]).read_text(encoding="utf-8"))
    result = SectionResult(sink=Path(args[1]))
    result.flush()
    try:
        run(spec, result)
    except Exception:  # reported by the orchestrator from the log, next to the lines that are missing
        traceback.print_exc()
        return 1
    finally:
        result.flush()
    return 0


def reason_of(error: BaseException) -> str:
    """A one-line reason: the exception type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def as_float(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
