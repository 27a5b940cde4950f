"""The per-stage progress board: stages in order, counts that never go back, skipped stages."""

from __future__ import annotations

from studio.progress import ProgressBoard


def _rows(board: ProgressBoard) -> dict[str, tuple[str, int, int]]:
    return {name: (row.status, row.current, row.total) for name, row in board.rows.items()}


def test_a_later_stage_closes_the_earlier_ones() -> None:
    board = ProgressBoard()
    board.accepted("job-1", 0)
    assert board.advance("lm_codes", 0.1, 5, 50, "5 tokens of 50") is True
    assert board.advance("lm_codes", 0.2, 10, 50, "10 tokens of 50") is False
    assert board.summary() == "LM codes 10/50"
    board.advance("diffusion", 0.5, 4, 8, "")
    rows = _rows(board)
    assert rows["lm_metadata"][0] == "skipped" and rows["lm_codes"] == ("done", 50, 50)
    assert rows["diffusion"] == ("running", 4, 8)


def test_interleaved_item_counts_do_not_go_backwards() -> None:
    board = ProgressBoard()
    for current in (1, 2, 1, 3, 2):  # two items of a batch report their codes in turn
        board.advance("lm_codes", current / 50, current, 50, "")
    assert _rows(board)["lm_codes"] == ("running", 3, 50)


def test_finish_and_failure_show_in_the_html() -> None:
    board = ProgressBoard()
    board.accepted("job-1", 2)
    board.advance("diffusion", 1.0, 8, 8, "")
    board.item_ready(1, 2)
    html = board.html()
    assert 'data-state="running"' in html and 'data-stage="queued"' in html and "1 of 2 item(s) ready" in html
    board.finish()
    assert 'data-stage="diffusion" data-status="done" data-current="8" data-total="8"' in board.html()
    assert _rows(board)["encode"][0] == "skipped"
    board.fail("the DiT replica <dit0> failed")
    assert 'data-state="failed"' in board.html() and "&lt;dit0&gt;" in board.html()
