"""The gradio app on a real finished tiny study: a real server, a client request, a browser screenshot."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from cdp import Browser, chromium_available
from PIL import Image

pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(finished_study):
    from sdsweep.results.app import StudyApp, build_ui

    app = StudyApp(finished_study, device="cpu")
    demo = build_ui(app)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.slow
def test_a_client_request_generates_from_a_trial_and_weights_load_once(served):
    from gradio_client import Client

    app, url = served
    assert app.choices()[0] == "baseline" and len(app.choices()) == 5  # 2 lr x 2 steps, all kept
    client = Client(url, verbose=False)
    first = Image.open(client.predict("1", "a photo of sks", 3, None, api_name="/generate"))
    again = Image.open(client.predict("1", "a photo of sks", 3, None, api_name="/generate"))
    assert first.size == (32, 32) and np.asarray(first).std() > 1
    assert np.array_equal(np.asarray(first), np.asarray(again))  # same trial, prompt and seed
    assert app.loads == 1  # the trial's weights were loaded once and reused
    left, right = client.predict("baseline", "1", "a photo of sks", 3, api_name="/compare")
    assert np.array_equal(np.asarray(Image.open(right)), np.asarray(first))
    assert not np.array_equal(np.asarray(Image.open(left)), np.asarray(first))  # the fine-tune changed it
    assert app.loads == 2


@pytest.mark.slow
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
def test_the_app_renders_in_headless_chromium(served, tmp_path):
    _, url = served
    browser = Browser(tmp_path / "profile", width=1200, height=900)
    try:
        browser.navigate(url)
        browser.wait_for("document.body.innerText.includes('Leaderboard')", timeout=60)
        browser.wait_for("document.body.innerText.includes('eval/clip_score')", timeout=60)
        shot = np.asarray(Image.open(browser.screenshot(tmp_path / "app.png")).convert("L"))
    finally:
        browser.close()
    assert shot.shape[1] >= 1000 and shot.std() > 5  # not a blank page
    assert len(np.unique(shot)) > 20
