"""The studio page (``python -m studio``) as a real process in front of the e2e stack's gateway.

gradio_client calls each named endpoint as the v1 deployment guide's scripts do (tiny settings:
10 s songs, 8 steps, one item, thinking off; the operations on a 2 s upload), and headless
Chromium (Debian's ``chromium``, driven by playwright; no browser is downloaded) uses the page:
generate with live per-stage progress, play the result, send it to Retake and Extend, reload and
find the job again. The screenshots' folder is printed (``pytest -s``, or on failure).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import Page, sync_playwright

from gateway.serve import ServiceProcess
from shared.constants import SAMPLE_RATE_HZ
from shared.process_lifeline import parent_death_preexec
from tests.e2e.conftest import SOURCE_SECONDS
from tests.e2e.helpers import decode_file

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
NAMED_ENDPOINTS = {"/__call__", "/retake_process_func", "/repaint_process_func", "/edit_process_func",
                   "/extend_process_func", "/cover_process_func", "/create_sample", "/format_sample",
                   "/understand_music"}
QUICK = dict(batch_size=1, thinking=False, use_cot_metas=False, use_cot_caption=False, use_cot_language=False)
WAIT_MS = 300_000  # a generation on the shared CI machine, source encoding included


@pytest.fixture(scope="module")
def studio_url(address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("studio")
    port_file, log_path = workdir / "studio.port", workdir / "studio.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(workdir / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "studio", "--gateway", address, "--port", "0", "--port-file", str(port_file),
               "--work-dir", str(workdir)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=parent_death_preexec(signal.SIGTERM))
    studio = ServiceProcess("studio", process, port_file, log_path)
    try:
        studio.wait_port(180.0)
        yield f"http://127.0.0.1:{studio.port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def gradio(studio_url: str, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(studio_url, verbose=False, download_files=str(tmp_path_factory.mktemp("studio-downloads")))


@pytest.fixture(scope="module")
def source_file(source_wav: bytes, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("studio-source") / "source.wav"
    path.write_bytes(source_wav)
    return str(path)


@pytest.fixture(scope="module")
def text2music(gradio: Client) -> tuple[Any, ...]:
    """The guide's Text2Music call (tiny settings)."""
    return gradio.predict(format="wav", audio_duration=10, prompt="pop, upbeat, guitar, 120 BPM",
                          lyrics="[verse] morning light\n[chorus] fly free", infer_step=8, guidance_scale=15,
                          cfg_type="apg", manual_seeds="12345", **QUICK, api_name="/__call__")


def _seconds(path: str) -> float:
    waveform, rate, _ = decode_file(Path(path).read_bytes())
    assert rate == SAMPLE_RATE_HZ
    return waveform.shape[1] / rate


def test_the_page_names_its_endpoints_as_v1_does(gradio: Client) -> None:
    api = gradio.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == NAMED_ENDPOINTS
    retake = [p["parameter_name"] for p in api["named_endpoints"]["/retake_process_func"]["parameters"]]
    assert retake[:3] == ["json_data", "retake_variance", "retake_seeds"]  # v1's, in v1's order


def test_text2music_returns_the_audio_and_the_parameters_json(text2music: tuple[Any, ...]) -> None:
    audio_path, record = text2music[0], text2music[1]
    assert _seconds(audio_path) == 10.0
    assert record["request_id"] and record["item_index"] == 0 and record["actual_seeds"] == [12345]
    params = record["params"]
    assert (params["task_type"], params["inference_steps"], params["guidance_scale"], params["cfg_type"]) == \
        ("text2music", 8, 15.0, "apg")
    assert [item["format"] for item in record["items"]] == ["wav"]
    assert 'data-state="done"' in text2music[-2]  # the progress board of the last frame


def test_refusals_carry_the_gateways_message(gradio: Client) -> None:
    with pytest.raises(AppError, match=r"duration must be in \[10, 600\] seconds"):
        gradio.predict(prompt="lo-fi", audio_duration=700, **QUICK, api_name="/__call__")
    with pytest.raises(AppError, match="json_data names no result"):
        gradio.predict(json_data={}, api_name="/retake_process_func")
    with pytest.raises(AppError, match="no source audio"):
        gradio.predict(extend_source="upload", right_extend_length=5, api_name="/extend_process_func")


def test_retake_of_a_result_by_its_parameters_json(gradio: Client, text2music: tuple[Any, ...]) -> None:
    result = gradio.predict(json_data=text2music[1], retake_variance=0.3, retake_seeds="67890",
                            api_name="/retake_process_func")
    params = result[1]["params"]
    assert params["task_type"] == "retake" and params["retake_seeds"] == [67890]
    assert params["source_request_id"] == text2music[1]["request_id"]
    assert params["retake_variance"] == pytest.approx(0.3)
    assert _seconds(result[0]) == 10.0 and result[1]["format"] == "wav"  # the source's format


@pytest.mark.parametrize("api_name, values, task_type, seconds", [
    ("/edit_process_func", dict(edit_type="remix", edit_prompt="rock, electric guitar",
                                edit_lyrics="[chorus] new words", edit_n_min=0.7), "edit", SOURCE_SECONDS),
    ("/extend_process_func", dict(left_extend_length=4, right_extend_length=4, extend_source="text2music"),
     "extend", SOURCE_SECONDS + 8),
    ("/repaint_process_func", dict(repaint_source="upload", prompt="pop", repaint_start=0.5, repaint_end=1.5),
     "repaint", SOURCE_SECONDS),
    ("/cover_process_func", dict(cover_source="upload", prompt="jazz cover"), "cover", SOURCE_SECONDS),
], ids=["edit", "extend", "repaint", "cover"])
def test_operations_on_an_upload(gradio: Client, source_file: str, api_name: str, values: dict[str, Any],
                                 task_type: str, seconds: float) -> None:
    """As the guide's scripts: the source is an uploaded file (``source_audio``)."""
    result = gradio.predict(source_audio=handle_file(source_file), infer_step=4, **values, api_name=api_name)
    assert result[1]["params"]["task_type"] == task_type
    assert _seconds(result[0]) == pytest.approx(seconds, abs=0.05)


def test_lm_endpoints_fill_the_form(gradio: Client, source_file: str) -> None:
    sample = gradio.predict(query="a soft piano ballad for a rainy night", api_name="/create_sample")
    assert len(sample) == 8 and isinstance(sample[0], str) and isinstance(sample[7], bool)
    formatted = gradio.predict(prompt="latin pop", lyrics="[verse] hola", api_name="/format_sample")
    assert len(formatted) == 7 and isinstance(formatted[0], str)
    caption, lyrics, metadata = gradio.predict(source_audio=handle_file(source_file), api_name="/understand_music")
    assert isinstance(caption, str) and isinstance(lyrics, str)
    assert set(metadata) == {"bpm", "duration", "keyscale", "language", "timesignature"}
    with pytest.raises(AppError, match="nothing to understand"):
        gradio.predict(api_name="/understand_music")


# --- the page in a browser -------------------------------------------------------------------

# Records every state of a progress board: [[stage, status, current, total], ...] per change.
OBSERVE_PROGRESS = """(selector) => {
  const board = document.querySelector(selector);
  window.studioProgress = [];
  const record = () => window.studioProgress.push([...board.querySelectorAll('.studio-stage')].map(
      row => [row.dataset.stage, row.dataset.status, Number(row.dataset.current), Number(row.dataset.total)]));
  new MutationObserver(record).observe(board, {subtree: true, childList: true, attributes: true});
}"""
# The <audio> elements under a player (shadow roots included): source, duration, position.
AUDIO_STATE = """(selector) => {
  const found = [];
  const walk = (node) => {
    if (node.tagName === 'AUDIO' && (node.currentSrc || node.src))
      found.push({src: node.currentSrc || node.src, duration: node.duration, time: node.currentTime});
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children) walk(child);
  };
  walk(document.querySelector(selector));
  return found;
}"""
PLAYING = f"(selector) => ({AUDIO_STATE})(selector).some(a => a.duration > 0 && a.time > 0)"


class Browser:
    """One page of the studio, with screenshots numbered in order."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.count = 0
        self.generated = ""  # request ids of the jobs the test started
        self.extended = ""

    def shot(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.shots / f"{self.count:02d}-{name}.png"), full_page=True)

    def wait_done(self, tab: str) -> str:
        """Wait for the tab's job to end well; returns its request id."""
        board = self.page.wait_for_selector(f'#{tab}-progress .studio-progress[data-state="done"]', timeout=WAIT_MS)
        return board.get_attribute("data-request-id")

    def play(self, player: str) -> dict[str, Any]:
        """Press play on a result's player and wait until its audio advances."""
        self.page.click(f"{player} button[aria-label='Play']")
        self.page.wait_for_function(PLAYING, arg=player, timeout=60_000)
        audio = [a for a in self.page.evaluate(AUDIO_STATE, player) if a["duration"] > 0]
        self.page.click(f"{player} button[aria-label='Pause']")
        return audio[0]

    def open_tab(self, label: str) -> None:
        self.page.get_by_role("tab", name=label).click()


def _progress_advanced(states: list[list[list[Any]]]) -> bool:
    """Some stage was seen running at two different counts below its total."""
    counts: dict[str, set[int]] = {}
    for rows in states:
        for stage, status, current, total in rows:
            if status == "running" and 0 < current < total:
                counts.setdefault(stage, set()).add(current)
    return any(len(seen) >= 2 for seen in counts.values())


def test_generate_play_retake_extend_and_reattach_in_a_browser(studio_url: str,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    shots = tmp_path_factory.mktemp("studio-screenshots")
    print(f"studio screenshots: {shots}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ui = Browser(browser.new_page(viewport={"width": 1400, "height": 1000}), shots)
            _generate_and_play(ui, studio_url)
            _retake_and_extend(ui)
            ui.page.reload()  # the page finds its jobs again
            ui.page.wait_for_selector("#generate-caption textarea")
            assert ui.wait_done("generate") == ui.generated
            ui.shot("reloaded")
            assert ui.play("#generate-audio-0")["duration"] == pytest.approx(10.0, abs=0.05)
            ui.open_tab("Extend")
            assert ui.wait_done("extend") == ui.extended
        finally:
            browser.close()


def _generate_and_play(ui: Browser, url: str) -> None:
    page = ui.page
    page.goto(url)
    page.wait_for_selector("#generate-caption textarea")
    ui.shot("open")
    page.fill("#generate-caption textarea", "lo-fi piano loop, warm vinyl crackle")
    page.fill("#generate-duration input", "10")
    page.evaluate(OBSERVE_PROGRESS, "#generate-progress")
    page.click("#generate-button")  # thinking on: LM metadata, LM codes n/50, diffusion, decode
    page.wait_for_selector('#generate-progress .studio-progress[data-state="running"]', timeout=WAIT_MS)
    ui.shot("running")
    ui.generated = ui.wait_done("generate")
    ui.shot("generated")
    states = page.evaluate("window.studioProgress")
    assert _progress_advanced(states), states
    assert all(status in ("done", "skipped") for _, status, _, _ in states[-1])
    for index in (0, 1):  # batch size 2: two players
        audio = ui.play(f"#generate-audio-{index}")
        assert audio["duration"] == pytest.approx(10.0, abs=0.05) and audio["time"] > 0


def _retake_and_extend(ui: Browser) -> None:
    page = ui.page
    page.click("#generate-send-retake-0")
    page.wait_for_selector("#retake-button", state="visible")
    assert ui.generated in page.inner_text("#retake-source")
    page.click("#retake-button")
    retaken = ui.wait_done("retake")
    ui.shot("retake")
    assert retaken != ui.generated
    assert ui.play("#retake-audio-0")["duration"] == pytest.approx(10.0, abs=0.05)

    ui.open_tab("Generate")
    page.click("#generate-send-extend-0")
    page.wait_for_selector("#extend-button", state="visible")
    assert ui.generated in page.inner_text("#extend-source")
    page.fill("#extend-left input", "0")
    page.fill("#extend-right input", "2")
    page.click("#extend-button")
    ui.extended = ui.wait_done("extend")
    ui.shot("extend")
    assert ui.play("#extend-audio-0")["duration"] == pytest.approx(12.0, abs=0.05)
