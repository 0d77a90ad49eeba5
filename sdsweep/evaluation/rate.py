"""Blind human rating of a study's eval images on a local web page.

    python -m sdsweep.rate experiments/<study> [--port 8765] [--host 127.0.0.1]

Open the printed address, enter a rater name, then mark each image appropriate (y) or not (n), optionally
with a 1-5 quality score (keys 1-5) first; arrows move back and forward. Images come one at a time in a
shuffle seeded per rater, without trial labels. Each rating is written to ``<study>/ratings.csv`` at once
(atomically); a reload resumes at the first image this rater has not rated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from sdsweep.evaluation import ratings

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sdsweep: rate images</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 40em; text-align: center; }
 #photo { width: 320px; height: 320px; image-rendering: pixelated; border: 1px solid #ccc; }
 button { font-size: 1.1em; margin: .2em; padding: .4em .9em; }
 button.chosen { background: #1971c2; color: white; }
 .hint { color: #666; font-size: .9em; }
</style></head>
<body>
<div id="login">
  <h1>Rate images</h1>
  <form id="login-form"><input id="rater" name="rater" placeholder="your name" autofocus>
  <button id="start" type="submit">Start</button></form>
</div>
<div id="rating" hidden>
  <p id="progress"></p>
  <img id="photo" alt="image to rate">
  <p>Is this image appropriate?</p>
  <div><button id="yes">Yes (y)</button><button id="no">No (n)</button></div>
  <p>Quality (optional, before yes/no):</p>
  <div id="quality"></div>
  <p><button id="prev">&larr; back</button><button id="next">skip &rarr;</button></p>
  <p class="hint">Keys: y / n answer and move on, 1-5 quality, &larr; / &rarr; move.</p>
</div>
<div id="done" hidden><h1>All images rated. Thank you!</h1><p id="done-count"></p></div>
<script>
const state = { rater: null, images: [], answers: {}, index: 0, quality: null };
const $ = (id) => document.getElementById(id);
for (let q = 1; q <= 5; q++) {
  const b = document.createElement("button"); b.textContent = q; b.id = "q" + q;
  b.onclick = () => setQuality(q); $("quality").appendChild(b);
}
function setQuality(q) {
  state.quality = state.quality === q ? null : q;
  for (let k = 1; k <= 5; k++) $("q" + k).classList.toggle("chosen", state.quality === k);
}
function firstUnrated() {
  const i = state.images.findIndex((id) => !(id in state.answers));
  return i < 0 ? state.images.length : i;
}
function show() {
  const n = state.images.length, rated = Object.keys(state.answers).length;
  if (state.index >= n && rated >= n) {
    $("rating").hidden = true; $("done").hidden = false;
    $("done-count").textContent = rated + " of " + n + " rated"; return;
  }
  state.index = Math.max(0, Math.min(state.index, n - 1));
  $("rating").hidden = false; $("done").hidden = true;
  const id = state.images[state.index];
  $("photo").src = "/image?id=" + encodeURIComponent(id);
  const previous = state.answers[id];
  $("progress").textContent = "Image " + (state.index + 1) + " of " + n + " (" + rated + " rated)"
    + (previous ? " - your answer: " + previous : "");
  state.quality = null; setQuality(null);
}
async function answer(value) {
  const id = state.images[state.index];
  const response = await fetch("/rate", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ rater: state.rater, image: id, answer: value, quality: state.quality }) });
  if (!response.ok) { alert(await response.text()); return; }
  state.answers[id] = value;
  state.index = firstUnrated(); show();
}
async function start(rater) {
  state.rater = rater;
  const q = await (await fetch("/queue?rater=" + encodeURIComponent(rater))).json();
  state.images = q.images; state.answers = q.answers;
  // The name field has autofocus: hiding it does not move the focus at once, and keys typed into a hidden
  // field would be dropped by the handler below (a rater resuming from the URL pressed "<-" in vain).
  $("login").hidden = true; $("rater").blur(); state.index = firstUnrated(); show();
  history.replaceState(null, "", "/?rater=" + encodeURIComponent(rater));
}
$("login-form").onsubmit = (e) => { e.preventDefault(); const r = $("rater").value.trim(); if (r) start(r); };
$("yes").onclick = () => answer("yes");
$("no").onclick = () => answer("no");
$("prev").onclick = () => { state.index -= 1; show(); };
$("next").onclick = () => { state.index += 1; show(); };
document.addEventListener("keydown", (e) => {
  const typingName = e.target.tagName === "INPUT" && !$("login").hidden;
  if (!state.rater || typingName) return;
  if (e.key === "y") answer("yes");
  else if (e.key === "n") answer("no");
  else if ("12345".includes(e.key) && e.key.length === 1) setQuality(Number(e.key));
  else if (e.key === "ArrowLeft") { state.index -= 1; show(); }
  else if (e.key === "ArrowRight") { state.index += 1; show(); }
});
const fromUrl = new URLSearchParams(location.search).get("rater");
if (fromUrl) start(fromUrl);
</script></body></html>
"""


def image_token(image: str) -> str:
    """An opaque id for the page: the sample's path would name its trial and unblind the rater."""
    return hashlib.sha256(image.encode()).hexdigest()[:16]


@dataclass
class RatingSite:
    """What the handler needs: the study folder and its images by id (no trial labels reach the page)."""

    study_dir: Path
    images: dict[str, ratings.RatableImage]

    @classmethod
    def of(cls, study_dir: str | Path) -> RatingSite:
        study = Path(study_dir)
        return cls(study, {item.image: item for item in ratings.ratable_images(study)})

    def __post_init__(self) -> None:
        self.by_token = {image_token(image): image for image in self.images}

    def queue(self, rater: str) -> dict:
        order = ratings.rater_order(list(self.images.values()), rater)
        done = ratings.read_ratings(self.study_dir)
        mine = done[(done["rater"] == rater) & done["image"].isin(list(self.images))]
        return {
            "images": [image_token(item.image) for item in order],
            "answers": {image_token(i): a for i, a in zip(mine["image"], mine["answer"])},
        }


def make_handler(site: RatingSite) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet: one line per image would drown the console
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload: dict, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/":
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/queue":
                rater = (query.get("rater") or [""])[0].strip()
                if not rater:
                    return self._json({"error": "rater is required"}, HTTPStatus.BAD_REQUEST)
                self._json(site.queue(rater))
            elif url.path == "/image":
                image = site.by_token.get((query.get("id") or [""])[0])
                if image is None:  # only listed samples, by token: no path traversal
                    return self._send(HTTPStatus.NOT_FOUND, b"unknown image", "text/plain")
                self._send(HTTPStatus.OK, (site.study_dir / image).read_bytes(), "image/png")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self):
            if urlparse(self.path).path != "/rate":
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                quality = body.get("quality")
                rating = ratings.Rating(
                    rater=str(body.get("rater", "")).strip(),
                    image=site.by_token.get(str(body.get("image", "")), ""),
                    answer=str(body.get("answer", "")),
                    quality=int(quality) if quality not in (None, "") else None,
                )
                ratings.save_rating(site.study_dir, rating, site.images)
            except (ValueError, TypeError) as error:
                return self._send(HTTPStatus.BAD_REQUEST, str(error).encode(), "text/plain")
            self._json({"ok": True})

    return Handler


def make_server(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    site = RatingSite.of(study_dir)
    if not site.images:
        raise SystemExit(
            f"{study_dir}: no eval samples to rate (expected baseline/samples/*.png or trials/*/samples/*.png); "
            "run a sweep first."
        )
    return ThreadingHTTPServer((host, port), make_handler(site))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdsweep.rate", description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study folder, e.g. experiments/lr_steps")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    args = parser.parse_args(argv)
    server = make_server(args.study, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"Rating {len(RatingSite.of(args.study).images)} images: open http://{host}:{port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
