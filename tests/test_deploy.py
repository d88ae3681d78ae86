"""predict, export and serve on saved weights."""

import csv
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kdist import KdistError
from kdist.cli import main
from kdist.data import dihedral, to_float
from kdist.datasets import default_spec
from kdist.inference import predict_probs
from kdist.models import create_model, save_weights

CLASS_NAMES = default_spec().classes


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    for role in ("student", "teacher"):
        save_weights(
            create_model(role, mean=[0.76, 0.54, 0.56], std=[0.14, 0.15, 0.17]).eval(),
            folder / f"{role}.safetensors",
            {"data_size": 28},
        )
    return folder


@pytest.fixture(scope="module")
def lesion_images(tmp_path_factory):
    """A 600x450 photo-sized JPEG, a grayscale PNG and an RGBA PNG in a folder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(folder / "lesion.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)).save(folder / "alpha.png")
    return folder


def test_predict_folder_with_teacher(tmp_path, weights, lesion_images, capsys):
    out = tmp_path / "p.csv"
    code = main(
        [
            "predict",
            str(weights / "student.safetensors"),
            str(lesion_images),
            "--teacher",
            str(weights / "teacher.safetensors"),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["alpha.png", "gray.png", "lesion.jpg"]
    for row in rows:
        assert row["predicted"] in CLASS_NAMES and row["teacher_predicted"] in CLASS_NAMES
        assert sum(float(row[f"prob_{c}"]) for c in CLASS_NAMES) == pytest.approx(1, abs=1e-4)


def test_predict_json_and_a_bad_file(tmp_path, weights, lesion_images, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "predict",
                str(weights / "student.safetensors"),
                str(lesion_images / "lesion.jpg"),
                str(bad),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert len(json.loads(out.read_text())) == 1  # the good file is still predicted
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", str(weights / "student.safetensors"), str(bad), "--out", str(tmp_path / "q.csv")]) == 2


def test_predict_mean_views_is_blind_to_a_rotated_photo(tmp_path, weights, capsys):
    image = np.random.default_rng(1).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(image))).save(tmp_path / "b.png")

    def probs(*views):
        out = tmp_path / "p.csv"
        assert (
            main(
                [
                    "predict",
                    str(weights / "student.safetensors"),
                    str(tmp_path / "a.png"),
                    str(tmp_path / "b.png"),
                    "--out",
                    str(out),
                    *views,
                ]
            )
            == 0
        )
        rows = list(csv.DictReader(open(out)))
        return np.array([[float(row[f"prob_{c}"]) for c in CLASS_NAMES] for row in rows])

    plain, mean_views = probs(), probs("--views", "mean")
    assert np.abs(plain[0] - plain[1]).max() > 1e-3  # one view: the rotation shows
    np.testing.assert_allclose(mean_views[0], mean_views[1], atol=2e-6)


def test_export_onnx_matches_pytorch(tmp_path, weights, real_root, capsys):
    out = tmp_path / "student.onnx"
    code = main(
        [
            "export",
            str(weights / "student.safetensors"),
            "--onnx",
            str(out),
            "--data-root",
            str(real_root),
            "--check-images",
            "256",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked_images"] == 256 and report["max_abs_diff_probabilities"] < 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        probs = session.run(None, {"images": np.random.rand(batch, 3, 28, 28).astype(np.float32)})[0]
        assert probs.shape == (batch, 7)


def test_export_and_serve_mean_views_match_evaluate(tmp_path, weights, real_root, capsys):
    """--views mean in ONNX and in serve: the mean of the 8 flips/rotations, as predict_probs computes it."""
    out = tmp_path / "student-mean.onnx"
    assert (
        main(
            [
                "export",
                str(weights / "student.safetensors"),
                "--onnx",
                str(out),
                "--data-root",
                str(real_root),
                "--check-images",
                "64",
                "--views",
                "mean",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["views"] == "mean" and report["max_abs_diff_probabilities"] < 1e-4

    import io

    import onnxruntime

    from kdist.serve import Classifier

    images = np.random.default_rng(2).random((3, 3, 28, 28), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    straight, turned = (
        session.run(None, {"images": x})[0] for x in (images, np.ascontiguousarray(np.rot90(images, 1, (2, 3))))
    )
    np.testing.assert_allclose(straight, turned, atol=1e-5)

    photo = np.random.default_rng(3).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    answers = []
    for array in (photo, np.ascontiguousarray(np.rot90(photo))):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        answers.append(
            Classifier(weights / "student.safetensors", views="mean").classify(buffer.getvalue())["student"][
                "probabilities"
            ]
        )
    assert answers[0] == pytest.approx(answers[1], abs=2e-6)


CHROMIUM = shutil.which("chromium")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM, reason="Debian chromium not installed (make setup installs it where apt is usable)")
def test_serve_page_end_to_end_in_chromium(tmp_path, weights, lesion_images):
    from playwright.sync_api import sync_playwright

    from kdist.serve import make_server

    server = make_server(weights / "student.safetensors", weights / "teacher.safetensors", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (10 * 1024 * 1024 + 10))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            )
            page = browser.new_page()
            page.goto(url)
            assert "not a medical device" in page.content()

            page.set_input_files("#file", str(not_image))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "not an image" in page.text_content("#error")
            page.set_input_files("#file", str(big))
            page.wait_for_function("document.getElementById('error').textContent.includes('10 MB')")

            page.set_input_files("#file", str(lesion_images / "lesion.jpg"))  # the server survived
            page.wait_for_selector(".teacher .row")
            probs = [
                float(v) for v in page.eval_on_selector_all(".student .row", "rows => rows.map(r => r.dataset.prob)")
            ]
            assert len(probs) == 7 and sum(probs) == pytest.approx(1, abs=1e-3)
            page.screenshot(path=str(tmp_path / "serve.png"))
            browser.close()
    finally:
        server.shutdown()
    assert (tmp_path / "serve.png").stat().st_size > 5000


def test_server_rejects_oversized_upload_without_reading_it(weights):
    import http.client

    from kdist.serve import make_server

    server = make_server(weights / "student.safetensors", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Length", str(50 * 1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and "10 MB" in json.loads(response.read())["error"]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
    finally:
        server.shutdown()


def test_mean_views_is_the_softmax_of_the_logits_averaged_over_the_8_flips_rotations():
    torch.manual_seed(0)
    # A linear model on raw pixels: far from invariant, so one view and the mean of 8 differ clearly.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, len(CLASS_NAMES)))
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        by_hand = torch.softmax(
            torch.stack([model(to_float(dihedral(images, view))) for view in range(8)]).mean(0), dim=1
        )
    mean_views = predict_probs(model, images, batch_size=4, views="mean")
    np.testing.assert_allclose(mean_views, by_hand.numpy(), atol=1e-6)
    # Invariant to a flip/rotation of the input; the image as it is is not.
    turned = dihedral(images, 5)
    np.testing.assert_allclose(predict_probs(model, turned, views="mean"), mean_views, atol=1e-6)
    assert np.abs(predict_probs(model, turned) - predict_probs(model, images)).max() > 0.05
    with pytest.raises(KdistError, match="views must be one of one, mean"):
        predict_probs(model, images, views="all")
