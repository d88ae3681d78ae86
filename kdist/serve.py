"""`kdist serve`: a small local web page to try the distilled model on one lesion image.

Standard library only (http.server): the page posts the raw file to /predict and draws the class
probabilities as bars. Bad uploads get a message on the page; the server keeps serving.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import KdistError
from .inference import data_size, predict_probs
from .models import load_model
from .preprocess import decode_image, to_batch, to_model_array

MAX_UPLOAD = 10 * 1024 * 1024

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>kdist</title>
<style>body{font-family:sans-serif;max-width:760px;margin:2em auto;padding:0 1em}
.note{background:#fff3cd;padding:.6em;border:1px solid #e0c36c}.row{display:flex;align-items:center;margin:2px 0}
.label{width:330px;font-size:14px}.bar{height:16px;background:#3b7dd8}.teacher .bar{background:#999}
.value{margin-left:6px;font-size:13px}#error{color:#b00020;font-weight:bold}img{max-width:160px;margin:1em 0}</style></head>
<body><h1>kdist: skin-lesion classifier</h1>
<p class="note"><b>Research tool, not a medical device.</b> Do not use it to diagnose or reassure anyone.</p>
<p>Upload a dermoscopic image (JPEG or PNG, up to 10 MB). It is centre-cropped and resized to SIZE px, as in training.</p>
<input type="file" id="file" accept="image/*"><div id="error"></div><img id="preview" alt="">
<div id="results"></div>
<script>
const results = document.getElementById('results'), error = document.getElementById('error');
function bars(title, probs, cls) {
  let html = `<h2>${title}</h2><div class="${cls}">`;
  for (const [name, p] of Object.entries(probs)) {
    html += `<div class="row" data-class="${name}" data-prob="${p}"><span class="label">${name}</span>` +
            `<span class="bar" style="width:${Math.round(p * 300)}px"></span><span class="value">${(100 * p).toFixed(1)}%</span></div>`;
  }
  return html + '</div>';
}
document.getElementById('file').addEventListener('change', async (event) => {
  const file = event.target.files[0];
  results.innerHTML = ''; error.textContent = '';
  if (!file) return;
  document.getElementById('preview').src = URL.createObjectURL(file);
  if (file.size > MAXBYTES) { error.textContent = 'File is over 10 MB; choose a smaller image.'; return; }
  try {
    const response = await fetch('/predict', {method: 'POST', body: file});
    const answer = await response.json();
    if (!response.ok) { error.textContent = answer.error; return; }
    let html = bars('Distilled student: ' + answer.student.predicted, answer.student.probabilities, 'student');
    if (answer.teacher) html += bars('Teacher: ' + answer.teacher.predicted, answer.teacher.probabilities, 'teacher');
    results.innerHTML = html;
  } catch (e) { error.textContent = 'The server did not answer: ' + e; }
});
</script></body></html>"""


class Classifier:
    """The loaded model(s); one lock so concurrent requests don't share the CPU threads badly."""

    def __init__(self, weights: Path, teacher: Path | None = None, views: str = "one"):
        self.size, self.views = data_size(weights), views
        self.models = {"student": load_model(weights)}
        self.classes = self.models["student"].dataset.classes
        if teacher:
            self.models["teacher"] = load_model(teacher, expect_dataset=self.models["student"].dataset)
        self.lock = threading.Lock()

    def classify(self, data: bytes) -> dict:
        batch = to_batch([to_model_array(decode_image(data, "upload"), self.size)])
        out = {}
        with self.lock:
            for role, model in self.models.items():
                probs = predict_probs(model, batch, views=self.views)[0]
                out[role] = {
                    "predicted": self.classes[int(probs.argmax())],
                    "probabilities": {name: round(float(p), 6) for name, p in zip(self.classes, probs)},
                }
        return out


def make_handler(classifier: Classifier):
    page = PAGE.replace("SIZE", str(classifier.size)).replace("MAXBYTES", str(MAX_UPLOAD)).encode()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/predict":
                return self._json(404, {"error": "not found"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, {"error": "the upload has no length"})
            if length > MAX_UPLOAD:
                self.close_connection = True  # don't read 10+ MB we will not use
                return self._json(413, {"error": f"upload of {length / 1e6:.1f} MB is over the 10 MB limit"})
            data = self.rfile.read(length) if length > 0 else b""
            try:
                self._json(200, classifier.classify(data))
            except KdistError as exc:
                self._json(400, {"error": str(exc)})
            except Exception as exc:  # a bad request must never take the server down
                self._json(500, {"error": f"could not classify this image ({type(exc).__name__})"})

        def log_message(self, fmt, *args):  # quiet: one line per request on stderr is enough
            pass

    return Handler


def make_server(
    weights: Path, teacher: Path | None = None, host: str = "127.0.0.1", port: int = 8000, views: str = "one"
) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(Classifier(weights, teacher, views)))
