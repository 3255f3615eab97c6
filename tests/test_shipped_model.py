"""The tiny NVLM-D shipped in nvlm/assets/tiny-nvlm (trained by recipes/train_tiny.py): inference only.

The held-out split is regenerated from the generator parameters recorded next to the model (the test scenes come
from their own random stream, so `n_train=0` writes the same 500 test images and questions), answered greedily and
scored; the accuracies must be the recorded ones (the README quotes them) and meet the issue's targets.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

from nvlm.assets import default_model_path
from nvlm.train.synthetic import answer_questions, evaluate, read_jsonl, write_dataset

ROOT = Path(__file__).resolve().parents[1]
NON_OCR = ("colour", "shape", "count", "position", "exist")
MIN_GAIN_OVER_MAJORITY = 0.05  # recorded: 78.6% vs 24.1% (README); a blind model scores at most the majority
NON_OCR_TARGET = 0.90  # issue 3, target (b); recorded: 94.2%


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    assert path is not None, "nvlm/assets/tiny-nvlm is missing: the package must ship its default model"
    return Path(path), json.loads((Path(path) / "training.json").read_text())


@pytest.fixture(scope="module")
def held_out(shipped, tmp_path_factory):
    _, info = shipped
    p = info["data"]
    out = tmp_path_factory.mktemp("held-out")
    write_dataset(out, n_train=0, n_test=p["n_test"], seed=p["seed"], tile_size=p["tile_size"], kinds=("qa",),
                  questions_per_image=p["questions_per_image"], weights=p["weights"], max_tiles=p["max_tiles"],
                  min_objects=p["min_objects"], max_objects=p["max_objects"], text_prob=p["text_prob"],
                  max_texts=p["max_texts"], text_scale=p["text_scale"])
    return out, read_jsonl(out / "test.jsonl")


def test_shipped_model_is_small_and_loads_by_default(shipped):
    import nvlm

    path, info = shipped
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 16 * 2 ** 20, f"the shipped model is {size / 2 ** 20:.1f} MiB"
    pipe = nvlm.load(path)
    assert pipe.config.image_size == info["data"]["tile_size"]


@pytest.mark.slow
def test_shipped_model_held_out_accuracy(shipped, held_out):
    import nvlm

    path, info = shipped
    data, records = held_out
    assert len(records) == info["scores"]["all"]["n"]
    pipe = nvlm.load(path)  # the CLI's defaults: CPU, float32 compute
    preds = answer_questions(pipe, records, data)
    got = evaluate(list(zip(records, preds)))
    recorded = info["scores"]
    for group, r in got.items():
        # The same greedy decoding on another CPU may flip an argmax or two: allow 1% of a group.
        assert r["accuracy"] == pytest.approx(recorded[group]["accuracy"], abs=0.01), group
    non_ocr = sum(got[t]["accuracy"] * got[t]["n"] for t in NON_OCR) / sum(got[t]["n"] for t in NON_OCR)
    assert non_ocr == pytest.approx(info["non_ocr_accuracy"], abs=0.01)
    assert non_ocr >= NON_OCR_TARGET, f"held-out non-OCR accuracy {non_ocr:.3f} is under the target"
    # The model reads the image: well above the answer an image-blind guesser gives most often.
    assert got["all"]["accuracy"] > got["all"]["majority_accuracy"] + MIN_GAIN_OVER_MAJORITY


def test_load_without_a_path_needs_the_bundled_model(monkeypatch):
    import nvlm
    import nvlm.assets

    monkeypatch.setattr(nvlm.assets, "default_model_path", lambda: None)
    with pytest.raises(ValueError, match="bundles no default model"):
        nvlm.load()


def example_answers() -> dict[str, str]:
    """The ground truth of examples/shapes.png, from the scene definition that draws it."""
    return load_script("examples/make_shapes.py").ANSWERS


def answer_space(question: str) -> set[str] | None:
    """The answers a question of the synthetic data can have (None: an OCR string)."""
    from nvlm.train.synthetic import COLOURS, POSITIONS, SHAPES

    if question.startswith("How many"):
        return {str(k) for k in range(10)}
    if question.startswith("What colour"):
        return set(COLOURS)
    if question.startswith("What shape"):
        return set(SHAPES)
    if question.startswith("Where"):
        return {p for row in POSITIONS for p in row}
    if question.startswith("Is there"):
        return {"yes", "no"}
    return None


def readme_main_command() -> tuple[list[str], str]:
    """The README's main command and the answer it shows (`nvlm chat ... "QUESTION"   # -> ANSWER`)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r'^nvlm chat --image (\S+) "([^"]+)"\s+# -> (.+)$', text, re.M)
    assert m, "the README's main command (nvlm chat --image ... # -> answer) is missing"
    return [m.group(1), m.group(2)], m.group(3).strip()


def test_readme_main_command_answers_without_model_argument(shipped):
    """The README's main command, as a user types it: no --model, no download; it prints what the README shows."""
    (image, question), shown = readme_main_command()
    out = subprocess.run([sys.executable, "-m", "nvlm", "chat", "--image", image, question], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == shown


def test_example_questions_get_answers_of_the_right_kind(shipped):
    """Every example question about examples/shapes.png gets an answer from its question's answer space (a colour
    for a colour question, a digit for a count, ...); how many are right is the held-out score's business. The
    OCR question is not checked: the shipped recipe leaves OCR out of training (README), its answer is empty."""
    import nvlm

    truth = example_answers()
    results = nvlm.load().generate(list(truth), [[ROOT / "examples" / "shapes.png"]] * len(truth))
    for q, r in zip(truth, results):
        space = answer_space(q)
        if space is not None:
            assert r.text in space, (q, r.text)

