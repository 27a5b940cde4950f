"""A copy of the reference implementation (ace-step/ACE-Step-1.5) in an ignored folder, for the bench.

``python -m devtools.bench_gpu.reference_checkout --src SRC [--rev REV] [--dest DIR]`` (``make
reference-checkout REFERENCE_SRC=...``): ``SRC`` is a local git directory (bare or not) or a URL.
From a local directory, the ``acestep/`` package of ``REV`` is exported file by file without the git
history (a partial mirror may lack some large blobs: those are listed and skipped); from a URL, a
shallow clone is made. The revision is written to ``DEST/.reference-revision``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DEST = Path(".reference/ACE-Step-1.5")
PACKAGE = "acestep"
REVISION_FILE = ".reference-revision"


def _git(src: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(src), *args], capture_output=True, check=True).stdout


def export_package(src: Path, rev: str, dest: Path) -> list[str]:
    """Write every file of ``PACKAGE`` at ``rev`` of the git directory ``src`` under ``dest``.

    Returns the paths whose blobs the repository does not hold (skipped).
    """
    commit = _git(src, "rev-parse", f"{rev}^{{commit}}").decode().strip()
    listing = _git(src, "ls-tree", "-r", "-z", commit, "--", PACKAGE).decode()
    skipped: list[str] = []
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind != "blob" or mode == "120000":
            continue
        try:
            content = _git(src, "cat-file", "blob", sha)
        except subprocess.CalledProcessError:
            skipped.append(path)
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    (dest / REVISION_FILE).write_text(commit + "\n", encoding="utf-8")
    return skipped


def clone(url: str, rev: str, dest: Path) -> None:
    """A shallow clone of ``url`` (``rev``: a branch or tag; HEAD for the default branch)."""
    branch = [] if rev == "HEAD" else ["--branch", rev]
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", *branch, url, str(dest)], check=True)
    commit = _git(dest, "rev-parse", "HEAD").decode().strip()
    (dest / REVISION_FILE).write_text(commit + "\n", encoding="utf-8")


def make_checkout(src: str, dest: Path = DEFAULT_DEST, rev: str = "HEAD") -> list[str]:
    """Replace ``dest`` with the reference at ``rev`` from ``src``; returns the skipped paths."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if Path(src).is_dir():
        return export_package(Path(src), rev, dest)
    dest.rmdir()
    clone(src, rev, dest)
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench_gpu.reference_checkout",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="git directory or URL of ace-step/ACE-Step-1.5")
    parser.add_argument("--rev", default="HEAD", help="revision (default HEAD)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    try:
        skipped = make_checkout(args.src, args.dest, args.rev)
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        print(f"reference checkout failed: {error} {detail.decode(errors='replace').strip()}")
        return 1
    revision = (args.dest / REVISION_FILE).read_text(encoding="utf-8").strip()
    print(f"{args.dest}: {PACKAGE}/ at {revision}" + (f"; {len(skipped)} files missing in the source: "
                                                     + ", ".join(skipped) if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
