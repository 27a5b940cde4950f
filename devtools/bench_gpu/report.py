"""Merging the sections' lines into one table (ours, reference, ours/reference) and writing it out."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from devtools.bench_gpu.spec import DIT_STAGES, DIT_THROUGHPUT, END_TO_END, FIRST_PCM, LM, MEMORY, Line, SectionResult

GROUP_ORDER = (DIT_STAGES, DIT_THROUGHPUT, LM, FIRST_PCM, END_TO_END, MEMORY)
UNAVAILABLE = "unavailable"
HEADER = ("group", "workload", "metric", "ours", "reference", "ours/ref")
GOAL_BOUND_MARGIN_S = 0.05


def merge(ours: list[SectionResult], reference: Optional[SectionResult]) -> list[Line]:
    """Our lines in section order, the reference's figures set on the matching lines (added when unmatched)."""
    lines: dict[tuple[str, str, str], Line] = {}
    for section in ours:
        for line in section.lines:
            lines[line.key] = Line(**asdict(line))
    for line in reference.lines if reference else []:
        if line.key in lines:
            lines[line.key].reference = line.reference
            lines[line.key].note = "; ".join(filter(None, (lines[line.key].note, line.note)))
        else:
            lines[line.key] = Line(**asdict(line))
    _add_derived(lines)
    return sorted(lines.values(), key=lambda line: GROUP_ORDER.index(line.group) if line.group in GROUP_ORDER else 99)


def _find(lines: dict[tuple[str, str, str], Line], group: str, metric: str, workload_part: str = "") -> list[Line]:
    return [line for line in lines.values() if line.group == group and line.metric == metric
            and workload_part in line.workload and line.ours is not None]


def _add_derived(lines: dict[tuple[str, str, str], Line]) -> None:
    """DiT + LM memory (the sum of the in-process peaks) and the first-PCM goal bound of the issue:
    LM + conditioning + diffusion of that request + one VAE tile (DiT section, same length) + 50 ms."""
    for metric in ("peak GPU memory GiB", "peak RSS GiB (cpu)"):
        peaks = [line.ours for line in _find(lines, MEMORY, metric, "(in process)")
                 if line.workload.startswith(("DiT service", "LM service"))]
        if len(peaks) == 2:
            key = (MEMORY, "DiT + LM (in process)", metric)
            reference = lines[key].reference if key in lines else None
            lines[key] = Line(*key, ours=sum(peaks), reference=reference, note="ours: sum of the two services' peaks")
    for request in _find(lines, FIRST_PCM, "first PCM chunk s", "1 full request"):
        length = request.workload.split(" s song")[0]
        parts = [lines.get((FIRST_PCM, request.workload, f"{key} s")) for key in
                 ("lm_total_time", "dit_conditioning_time", "dit_diffusion_time")]
        tile = lines.get((FIRST_PCM, f"{length} s song, DiT in process", "one VAE tile s"))
        if tile is not None and all(part is not None and part.ours is not None for part in parts):
            bound = sum(part.ours for part in parts) + tile.ours + GOAL_BOUND_MARGIN_S
            key = (FIRST_PCM, request.workload, "goal: LM + cond. + diffusion + 1 tile + 50 ms, s")
            lines[key] = Line(*key, ours=bound)


def format_value(value: Optional[float]) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def row_cells(line: Line, unavailable: dict[str, str]) -> tuple[str, ...]:
    reference = format_value(line.reference)
    if line.reference is None and line.group in unavailable:
        reference = UNAVAILABLE
    ratio = "-"
    if line.ours is not None and line.reference:
        ratio = f"{line.ours / line.reference:.2f}"
    return line.group, line.workload, line.metric, format_value(line.ours), reference, ratio


def text_table(lines: list[Line], unavailable: dict[str, str]) -> str:
    rows = [HEADER, *(row_cells(line, unavailable) for line in lines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    rendered = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) if column < 3 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        rendered.append("  ".join(cells).rstrip())
        if index == 0:
            rendered.append("  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def markdown_table(lines: list[Line], unavailable: dict[str, str]) -> str:
    rows = [f"| {' | '.join(HEADER)} |", "|" + "---|" * 3 + "---:|" * 3]
    rows += [f"| {' | '.join(row_cells(line, unavailable))} |" for line in lines]
    return "\n".join(rows)


def footnotes(unavailable: dict[str, str], notes: list[str]) -> list[str]:
    """The notes, then one ``reference: unavailable (<reason>)`` line per reason with its groups."""
    by_reason: dict[str, list[str]] = {}
    for group, reason in unavailable.items():
        by_reason.setdefault(reason, []).append(group)
    return [*notes, *(f"reference: unavailable ({reason}) -- {', '.join(groups)}" for reason, groups in by_reason.items())]


def write_outputs(out_dir: Path, title: str, lines: list[Line], unavailable: dict[str, str], notes: list[str],
                  meta: dict[str, Any]) -> tuple[Path, Path]:
    """``bench-gpu.json`` (every line with its ratio) and ``bench-gpu.md`` (the table and notes) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(line), "ratio": line.ours / line.reference if line.ours is not None and line.reference else None,
                "reference_unavailable": unavailable.get(line.group) if line.reference is None else None}
               for line in lines]
    json_path, md_path = out_dir / "bench-gpu.json", out_dir / "bench-gpu.md"
    json_path.write_text(json.dumps({**meta, "lines": records, "notes": notes, "unavailable": unavailable},
                                    indent=2) + "\n", encoding="utf-8")
    body = [f"## {title}", "", markdown_table(lines, unavailable), "", *(f"- {note}" for note in footnotes(unavailable, notes))]
    md_path.write_text("\n".join(body) + "\n", encoding="utf-8")
    return json_path, md_path
