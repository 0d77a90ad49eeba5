"""Blind human rating end to end: a real server, real headless Chromium with real clicks and keys."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cdp import Browser, chromium_available
from PIL import Image

from sdsweep import io
from sdsweep.evaluation import rate, ratings
from sdsweep.results import protocols as report_protocols
from sdsweep.results import table as results


def _write_sample(folder: Path, name: str, black: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((32, 32, 3), np.uint8) if black else rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    io.atomic_save_image(folder / io.TRIAL_SAMPLES / name, Image.fromarray(pixels))


@pytest.fixture
def study(tmp_path) -> Path:
    """A study folder laid out as a sweep leaves it: baseline and two trials, two samples each."""
    paths = io.StudyPaths(tmp_path / "study")
    _write_sample(paths.baseline, "p00_s1234.png", seed=1)
    _write_sample(paths.baseline, "p00_s1235.png", seed=2)
    io.atomic_write_json(
        paths.baseline / io.TRIAL_METRICS, {"state": "COMPLETE", "metrics": {"eval/appropriate_rate": 1.0}}
    )
    for number, rate_value in ((0, 1.0), (1, 0.5)):
        folder = paths.trial(number)
        _write_sample(folder, "p00_s1234.png", seed=10 + number)
        _write_sample(folder, "p00_s1235.png", black=number == 1, seed=20 + number)
        io.atomic_write_json(
            folder / io.TRIAL_METRICS,
            {"trial": number, "state": "COMPLETE", "metrics": {"eval/appropriate_rate": rate_value}},
        )
    return paths.root


@pytest.fixture
def server(study):
    httpd = rate.make_server(study, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _post(base: str, payload: dict) -> int:
    request = urllib.request.Request(
        f"{base}/rate", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        return urllib.request.urlopen(request).status
    except urllib.error.HTTPError as error:
        return error.code


def test_queue_is_shuffled_per_rater_and_bad_ratings_are_refused(study, server):
    alice = json.load(urllib.request.urlopen(f"{server}/queue?rater=alice"))["images"]
    again = json.load(urllib.request.urlopen(f"{server}/queue?rater=alice"))["images"]
    bob = json.load(urllib.request.urlopen(f"{server}/queue?rater=bob"))["images"]
    assert alice == again and sorted(alice) == sorted(bob) and alice != bob and len(alice) == 6
    assert all(len(token) == 16 and "/" not in token for token in alice)  # opaque: no trial in the page
    assert _post(server, {"rater": "bob", "image": "../../etc/passwd", "answer": "yes"}) == 400
    assert _post(server, {"rater": "bob", "image": alice[0], "answer": "maybe"}) == 400
    assert _post(server, {"rater": "", "image": alice[0], "answer": "yes"}) == 400
    assert _post(server, {"rater": "bob", "image": alice[0], "answer": "yes", "quality": 9}) == 400
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server}/image?id=../study.json")
    assert urllib.request.urlopen(f"{server}/image?id={alice[0]}").read()[:4] == b"\x89PNG"
    assert not (study / ratings.RATINGS_CSV).exists()


@pytest.mark.slow
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
def test_rating_in_headless_chromium_by_click_and_key_survives_a_reload(study, server, tmp_path):
    browser = Browser(tmp_path / "profile")
    rated = "Object.keys(state.answers).length"
    try:
        browser.navigate(server + "/")
        browser.click("#rater")
        browser.type_text("alice")
        browser.click("#start")
        browser.wait_for("document.getElementById('photo').complete && state.images.length === 6")
        tokens = browser.evaluate("state.images")
        site = rate.RatingSite.of(study)
        order = [site.by_token[token] for token in tokens]
        assert "trial" not in browser.evaluate("document.body.innerText").lower()  # blind: no labels

        browser.press("4")  # quality first, then the answer
        browser.click("#yes")
        browser.wait_for(f"{rated} === 1")
        browser.press("n")
        browser.wait_for(f"{rated} === 2")
        browser.click("#q2")
        browser.click("#no")
        browser.wait_for(f"{rated} === 3")

        browser.navigate(server + "/?rater=alice")  # stop and resume: nothing lost, first unrated image
        browser.wait_for("state.images.length === 6")
        assert browser.evaluate(rated) == 3 and browser.evaluate("state.index") == 3
        assert browser.evaluate("document.getElementById('progress').textContent").startswith("Image 4 of 6")

        # A key whose target is the hidden name field (autofocus can leave the focus there) still rates.
        browser.evaluate(
            "document.getElementById('rater').dispatchEvent("
            "new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true}))"
        )
        assert browser.evaluate("state.index") == 4
        browser.press("ArrowLeft")
        browser.press("ArrowLeft")  # back to image 3 and change the answer to yes
        assert browser.evaluate("state.index") == 2
        browser.press("y")
        browser.wait_for("state.answers[state.images[2]] === 'yes' && state.index === 3")
        for count in (4, 5, 6):
            browser.press("y")
            browser.wait_for(f"{rated} === {count}")
        browser.wait_for("!document.getElementById('done').hidden")
        screenshot = browser.screenshot(tmp_path / "done.png")
        assert Image.open(screenshot).size[0] > 100
    finally:
        browser.close()

    saved = ratings.read_ratings(study)
    assert len(saved) == 6 and set(saved["image"]) == set(order) and set(saved["rater"]) == {"alice"}
    by_image = saved.set_index("image")
    assert by_image.loc[order[0], "answer"] == "yes" and by_image.loc[order[0], "quality"] == 4
    assert by_image.loc[order[1], "answer"] == "no" and pd.isna(by_image.loc[order[1], "quality"])
    assert by_image.loc[order[2], "answer"] == "yes" and pd.isna(by_image.loc[order[2], "quality"])
    assert set(saved["trial"]) == {"baseline", "0", "1"}

    # A second rater; then the human/* columns reach the results table and the report.
    for token, image in zip(tokens, order):
        assert (
            _post(server, {"rater": "bob", "image": token, "answer": "no" if "0001" in image else "yes"})
            == 200
        )
    frame = results.build_results(io.StudyPaths(study))
    trial1 = frame.set_index("trial").loc[1]
    expected = float(saved[saved["trial"] == "1"]["answer"].eq("yes").sum() / 4)  # alice's 2 + bob's 2 "no"
    assert trial1["human/appropriate_n"] == 4 and trial1["human/raters"] == 2
    assert trial1["human/appropriate_rate"] == pytest.approx(expected)
    section = report_protocols.human_section(study, frame)
    assert "Human ratings" in section.markdown and "human/appropriate_rate" in section.html
    assert "baseline" in section.markdown
