"""Benchmark loaders and reply cuts (`nvlm.eval.tasks`).

For every benchmark: load a tiny fixture in the public release format, check ids, exact prompts (typed by hand from
EVAL.md / SPEC §7.3), image resolution, and that the reference fields score a right answer 1 and a wrong one 0 with
the real scorer. Images are drawn here with PIL; parquet and TSV files are written here from small row lists (the
parquet tests need pyarrow, the `eval` extra, and are skipped without it).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from nvlm.eval.metrics import BENCHMARKS
from nvlm.eval.score import score_records
from nvlm.eval.tasks import TASKS, DataError, Sample, load_samples, postprocess

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eval"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
COT = "Please reason step by step, and put your final answer within \\boxed{}."
HEAD_SYSTEM = "Follow the user's instruction and answer questions."


def image_bytes(label: str, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (48, 32), (240, 240, 240))
    ImageDraw.Draw(img).text((2, 10), label, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def draw(path: Path, label: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The loaders only need the file to exist; JPEG for .jpg so the files are what their names say.
    path.write_bytes(image_bytes(label, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


@pytest.fixture
def bench(tmp_path):
    """Copy a fixture directory to tmp_path and draw the named images inside it."""

    def make(name: str, images=()) -> Path:
        root = tmp_path / name
        shutil.copytree(FIXTURES / name, root)
        for rel in images:
            draw(root / rel, Path(rel).stem)
        return root

    return make


def score(benchmark: str, sample: Sample, prediction: str, protocol: str = "nvlm") -> float:
    return score_records(benchmark, [{"prediction": prediction, **sample.reference}], protocol)[0]


def check_wellformed(samples: list[Sample]) -> None:
    for s in samples:
        assert len(s.images) == s.prompt.count("<image>")
        json.dumps(s.reference, allow_nan=False)  # the runner writes references to JSONL


# ----------------------------------------------------------------------------------------------------------------
# Registry and generic behaviour


def test_tasks_cover_every_scored_benchmark():
    assert set(TASKS) == set(BENCHMARKS)
    assert len(TASKS) == 13


def test_unknown_benchmark_lists_names(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'.*mmmu"):
        load_samples("mmbench", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        postprocess("mmbench", "x")


def test_missing_path_names_file_and_format(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json: no such file.*TextVQA_0\.5\.1_val\.json"):
        load_samples("textvqa", tmp_path / "nothere.json")


def test_garbled_json_names_file(tmp_path):
    bad = tmp_path / "TextVQA_0.5.1_val.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"TextVQA_0\.5\.1_val\.json: not valid JSON"):
        load_samples("textvqa", bad)


def test_wrong_shape_and_missing_field(tmp_path, bench):
    flat = tmp_path / "flat.json"
    flat.write_text('{"questions": 3}', encoding="utf-8")
    with pytest.raises(DataError, match="expected TextVQA items"):
        load_samples("textvqa", flat)

    root = bench("textvqa", ["train_images/003a8ae2ef43b901.jpg"])
    data = json.loads((root / "TextVQA_0.5.1_val.json").read_text())
    del data["data"][0]["question"]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"item 0: missing field 'question'"):
        load_samples("textvqa", root)


def test_limit(bench):
    # Only the first two images exist: a limit stops before the third item is even looked at.
    root = bench("textvqa", ["train_images/003a8ae2ef43b901.jpg", "train_images/00685bc495504d61.jpg"])
    assert [s.id for s in load_samples("textvqa", root, limit=2)] == ["34602", "34603"]
    assert load_samples("textvqa", root, limit=0) == []
    with pytest.raises(DataError, match="0086c2b3e1e3a2cd.*not found"):
        load_samples("textvqa", root)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_samples("textvqa", root, limit=-1)


def test_duplicate_ids_rejected(bench):
    root = bench("textvqa", ["train_images/003a8ae2ef43b901.jpg", "train_images/00685bc495504d61.jpg"])
    data = json.loads((root / "TextVQA_0.5.1_val.json").read_text())
    data["data"][1]["question_id"] = data["data"][0]["question_id"]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="duplicate textvqa sample id '34602'"):
        load_samples("textvqa", root, limit=2)


def test_pyarrow_missing_gives_install_hint(tmp_path, monkeypatch):
    fake = tmp_path / "validation-00000-of-00001.parquet"
    fake.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install 'nvlm\[eval\]'"):
        load_samples("mmmu", fake)


# ----------------------------------------------------------------------------------------------------------------
# postprocess


REPLY = "  B\nBecause the second option\n\nmatches the chart.  "


@pytest.mark.parametrize("benchmark", ["textvqa", "vqav2", "chartqa", "ocrbench", "ai2d", "mmmu", "mathvista"])
def test_postprocess_tag_benchmarks(benchmark):
    assert postprocess(benchmark, REPLY) == "B"
    assert postprocess(benchmark, "\n\nfirst para line\nsecond line\n\nsecond para") == "first para line"
    assert postprocess(benchmark, REPLY, "official") == REPLY.strip()


def test_postprocess_head_benchmarks_strip_only():
    for benchmark in ("docvqa", "realworldqa"):
        assert postprocess(benchmark, REPLY) == REPLY.strip()
        assert postprocess(benchmark, REPLY, "official") == REPLY.strip()


def test_postprocess_text_benchmarks_keep_the_reply():
    cot = "Step 1: 3 * 12 = 36.\n\nStep 2: 36 - 10 = 26.\n\nThe answer is \\boxed{26}."
    for benchmark in ("gsm8k", "math"):
        assert postprocess(benchmark, cot) == cot
        assert postprocess(benchmark, cot, "official") == cot
    # MMLU's scorer applies lm-eval's first-line filter itself, which a leading newline defeats; keep it.
    assert postprocess("mmlu", "\nB") == "\nB"


def test_postprocess_humaneval_extracts_code():
    reply = "Here it is:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds.\n```python\nx = 1\n```"
    assert postprocess("humaneval", reply) == "def add(a, b):\n    return a + b\n"
    assert postprocess("humaneval", "```\n    return a + b\n") == "    return a + b\n"  # unclosed fence
    assert postprocess("humaneval", "    return a + b\n") == "    return a + b\n"  # no fence, indentation kept


def test_postprocess_end_markers_none_and_protocol():
    assert postprocess("textvqa", "yes<|im_end|>\nno") == "yes"
    assert postprocess("gsm8k", "42<|endoftext|>junk") == "42"
    assert postprocess("textvqa", None) == ""
    with pytest.raises(ValueError, match="unknown protocol"):
        postprocess("textvqa", "x", "megatron")


# ----------------------------------------------------------------------------------------------------------------
# TextVQA / VQAv2


def test_textvqa(bench):
    root = bench("textvqa", ["train_images/003a8ae2ef43b901.jpg", "train_images/00685bc495504d61.jpg"])
    draw(root / "train_images" / "0086c2b3e1e3a2cd.png")  # Megatron falls back to .png
    samples = load_samples("textvqa", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["34602", "34603", "34604"]
    s = samples[0]
    assert s.prompt == f"<image>\nwhat is the brand of this camera?\n{SHORT}"
    assert s.images == (str(root / "train_images" / "003a8ae2ef43b901.jpg"),)
    assert samples[2].images == (str(root / "train_images" / "0086c2b3e1e3a2cd.png"),)
    assert s.system == "Answer the questions." and s.max_new_tokens == 128
    assert len(s.reference["answers"]) == 10
    assert score("textvqa", s, postprocess("textvqa", "Nikon\n\nThe logo reads Nikon.")) == 1.0
    assert score("textvqa", s, "canon") == 0.0
    assert load_samples("textvqa", root / "TextVQA_0.5.1_val.json") == samples


def test_vqav2_official_pair(bench):
    root = bench("vqav2", ["val2014/COCO_val2014_000000262148.jpg", "val2014/COCO_val2014_000000393225.jpg"])
    samples = load_samples("vqav2", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["262148000", "262148001", "393225000"]
    s = samples[0]
    assert s.prompt == f"<image>\nWhere is he looking?\n{SHORT}"
    assert s.images == (str(root / "val2014" / "COCO_val2014_000000262148.jpg"),)
    assert s.reference["answers"] == ["down"] * 8 + ["at table"] * 2
    assert score("vqav2", s, "Down") == 1.0
    assert score("vqav2", s, "up") == 0.0
    assert score("vqav2", samples[1], "two") == 1.0  # "two" -> "2" in the VQA normaliser
    # Either half of the pair may be given.
    assert load_samples("vqav2", root / "v2_mscoco_val2014_annotations.json") == samples


def test_vqav2_missing_annotations_and_test_split(bench, tmp_path):
    root = bench("vqav2", ["val2014/COCO_val2014_000000262148.jpg", "val2014/COCO_val2014_000000393225.jpg"])
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError, match="no annotations file.*v2_mscoco_val2014_annotations.json"):
        load_samples("vqav2", root)

    test_dir = tmp_path / "testdev"
    questions = {"data_subtype": "test-dev2015", "questions": [{"image_id": 1, "question": "What?", "question_id": 10}]}
    (test_dir / "test2015").mkdir(parents=True)
    (test_dir / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(questions))
    draw(test_dir / "test2015" / "COCO_test2015_000000000001.jpg")
    [s] = load_samples("vqav2", test_dir)
    assert s.reference == {"answers": []}
    assert s.images == (str(test_dir / "test2015" / "COCO_test2015_000000000001.jpg"),)


def test_vqav2_megatron_list(bench):
    images = ["val2014/COCO_val2014_000000262148.jpg", "val2014/COCO_val2014_000000393225.jpg"]
    root = bench("vqav2_megatron", images)
    samples = load_samples("vqav2", root / "vqav2_val.json")
    check_wellformed(samples)
    assert [s.id for s in samples] == ["262148000", "393225000"]
    assert samples[0].prompt == f"<image>\nWhere is he looking?\n{SHORT}"
    # The second item names its image without an extension; Megatron's ".jpg" fallback finds it.
    assert samples[1].images == (str(root / "val2014" / "COCO_val2014_000000393225.jpg"),)
    assert score("vqav2", samples[1], "No") == 1.0
    assert score("vqav2", samples[1], "yes") == 0.0


# ----------------------------------------------------------------------------------------------------------------
# DocVQA / ChartQA / OCRBench


def test_docvqa(bench):
    root = bench("docvqa", ["documents/pybv0228_81.png", "documents/nkbl0226_1.png"])
    samples = load_samples("docvqa", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["49153", "24580"]
    s = samples[0]
    assert s.prompt == (
        "<image>\nWhat is the 'actual' value per 1000, during the year 1975?\n"
        "Answer the question using a single word, phrase, or number."
    )
    assert s.system == HEAD_SYSTEM
    assert s.images == (str(root / "documents" / "pybv0228_81.png"),)
    assert score("docvqa", s, "0.28") == 1.0
    assert score("docvqa", s, "banana") == 0.0
    assert score("docvqa", samples[1], "ITC Limited") == 1.0


def test_docvqa_answers_required_outside_test_split(bench):
    root = bench("docvqa", ["documents/pybv0228_81.png", "documents/nkbl0226_1.png"])
    data = json.loads((root / "val_v1.0.json").read_text())
    for item in data["data"]:
        del item["answers"]
    (root / "val_v1.0.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"val_v1\.0\.json, item 0: missing field 'answers'"):
        load_samples("docvqa", root)
    data["dataset_split"] = "test"
    (root / "val_v1.0.json").write_text(json.dumps(data))
    assert [s.reference for s in load_samples("docvqa", root)] == [{"answers": []}] * 2


def test_chartqa(bench):
    root = bench("chartqa", ["png/41699051005347.png", "png/multi_col_1021.png", "png/two_col_103562.png"])
    samples = load_samples("chartqa", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["test_human/0", "test_human/1", "test_augmented/0"]
    s = samples[0]
    assert s.prompt == f"<image>\nHow many food item is shown in the bar graph?\n{SHORT}"
    assert s.images == (str(root / "png" / "41699051005347.png"),)
    assert s.reference == {"answers": ["14"], "split": "test_human"}
    assert score("chartqa", s, "14") == 1.0
    assert score("chartqa", s, "20") == 0.0
    assert score("chartqa", samples[2], "46") == 1.0  # within 5% of 45.2
    only_augmented = load_samples("chartqa", root / "test_augmented.json")
    assert [s.id for s in only_augmented] == ["test_augmented/0"]


def test_ocrbench(bench):
    images = ["OCRBench_Images/IIIT5K/test/918_1.png", "OCRBench_Images/IC13_857/imgs/000000212.jpg",
              "OCRBench_Images/HME100k/test_images/train_28.jpg"]  # fmt: skip
    root = bench("ocrbench", images)
    samples = load_samples("ocrbench", root)  # finds OCRBench/OCRBench.json; images one level up
    check_wellformed(samples)
    assert [s.id for s in samples] == ["0", "1", "2"]  # the file's own ids repeat (211 twice)
    assert samples[0].prompt == "<image>\nwhat is written in the image?"
    assert samples[0].images == (str(root / "OCRBench_Images" / "IIIT5K" / "test" / "918_1.png"),)
    assert samples[0].reference == {"answers": "CENTRE", "dataset_name": "IIIT5K", "type": "Regular Text Recognition"}
    assert score("ocrbench", samples[0], "Centre") == 1.0
    assert score("ocrbench", samples[0], "center") == 0.0
    assert score("ocrbench", samples[1], "news agency newsagency") == 2.0  # Megatron counts each alternative
    assert score("ocrbench", samples[1], "news agency newsagency", "official") == 1.0
    assert score("ocrbench", samples[2], "$x^{2}+1$") == 1.0  # HME100k: spaces removed, case-sensitive


# ----------------------------------------------------------------------------------------------------------------
# AI2D / RealWorldQA


def test_ai2d_jsonl(bench):
    root = bench("ai2d", ["abc_images/4.png", "abc_images/11.png"])
    samples = load_samples("ai2d", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["0", "1"]
    s = samples[0]
    assert s.prompt == f"<image>\nwhich of these define dairy item\nA. c\nB. D\nC. b\nD. a\n{LETTER}"
    # "ai2diagram/abc_images/4.png" is found with its leading folder dropped.
    assert s.images == (str(root / "abc_images" / "4.png"),)
    assert s.reference == {"answers": ["D"], "choices": ["c", "D", "b", "a"]}
    assert score("ai2d", s, postprocess("ai2d", "(D)\nThe diagram shows milk.")) == 1.0
    assert score("ai2d", s, "B") == 0.0
    assert score("ai2d", s, "The answer is D.", "official") == 1.0


def test_ai2d_tsv(tmp_path):
    png = image_bytes("sky")
    b64 = base64.b64encode(png).decode()
    header = "index\tquestion\tA\tB\tC\tD\tanswer\timage\n"
    # pandas quotes a field holding a newline; an empty cell is a missing option; "1000" points at row 1000's image.
    rows = (
        f'1000\t"What is shown\nin the sky?"\tsun\tmoon\tstar\t\tB\t{b64}\n'
        "1001\tWhich is hot?\tice\tfire\tsnow\twater\tB\t1000\n"
    )
    tsv = tmp_path / "AI2D_TEST_NO_MASK.tsv"
    tsv.write_text(header + rows, encoding="utf-8")
    samples = load_samples("ai2d", tsv)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["1000", "1001"]
    assert samples[0].prompt == f"<image>\nWhat is shown\nin the sky?\nA. sun\nB. moon\nC. star\n{LETTER}"
    assert samples[0].images == (png,)
    assert samples[1].images == (png,)
    assert samples[0].reference == {"answers": ["B"], "choices": ["sun", "moon", "star"]}
    assert score("ai2d", samples[1], "B") == 1.0
    assert score("ai2d", samples[1], "A") == 0.0

    (tmp_path / "test_vlmevalkit.jsonl").write_text("")
    with pytest.raises(DataError, match="exactly one AI2D"):
        load_samples("ai2d", tmp_path)


def test_realworldqa_megatron(bench):
    root = bench("realworldqa", ["0.webp", "1.webp"])
    samples = load_samples("realworldqa", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["0", "1"]
    mc, open_ = samples
    assert mc.prompt == (
        "<image>\nIn which direction is the front wheel of the car on the right side facing?\n"
        f"A. Left\nB. Straight\nC. Right\n{LETTER}"
    )
    assert open_.prompt == f"<image>\nHow many traffic lights are visible?\n{SHORT}"
    assert mc.system == HEAD_SYSTEM
    assert mc.images == (str(root / "0.webp"),)
    assert mc.reference == {"answers": ["B"], "choices": ["Left", "Straight", "Right"]}
    assert score("realworldqa", mc, "B") == 1.0
    assert score("realworldqa", mc, "C") == 0.0
    assert score("realworldqa", open_, "three") == 1.0
    assert score("realworldqa", open_, "4") == 0.0


def test_realworldqa_hf_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    png = image_bytes("road")
    question = ("Which object is closer?\n\nA. the truck\nB. the sign\n\n"
                "Please answer directly with only the letter of the correct option and nothing else.")
    table = pa.table({
        "image": [{"bytes": png, "path": "0.webp"}, {"bytes": png, "path": "1.webp"}],
        "question": [question, "How many lanes are there?"],
        "answer": ["A", "2"],
    })  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    samples = load_samples("realworldqa", tmp_path)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].prompt == "<image>\n" + question
    assert samples[0].images == (png,)
    assert samples[0].reference == {"answers": ["A"], "choices": ["the truck", "the sign"]}
    assert score("realworldqa", samples[0], "A") == 1.0
    assert score("realworldqa", samples[0], "B") == 0.0
    assert load_samples("realworldqa", tmp_path, limit=1) == samples[:1]


# ----------------------------------------------------------------------------------------------------------------
# MMMU / MathVista


def write_mmmu(root: Path) -> dict[str, bytes]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = {}
    for row in json.loads((FIXTURES / "mmmu" / "rows.json").read_text()):
        row = dict(row)
        subject = row.pop("subject_dir")
        images[row["id"]] = image_bytes(row["id"][-8:])
        row["image_1"] = {"bytes": images[row["id"]], "path": None}
        for k in range(2, 8):
            row[f"image_{k}"] = None
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        schema_table = pa.Table.from_pylist([row])
        pq.write_table(schema_table, folder / "validation-00000-of-00001.parquet")
        if subject == "Art_Theory":  # the dev split beside it must not be read
            dev = pa.Table.from_pylist([{**row, "id": "dev_Art_Theory_1"}])
            pq.write_table(dev, folder / "dev-00000-of-00001.parquet")
    return images


def test_mmmu(tmp_path):
    images = write_mmmu(tmp_path)
    samples = load_samples("mmmu", tmp_path)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["validation_Art_Theory_1", "validation_Math_3", "validation_Physics_2"]
    art, math, physics = samples
    assert art.prompt == (
        "<image>\nWho painted ?\n(A) Claude Monet\n(B) Edgar Degas\n(C) Paul Cezanne\n(D) Vincent van Gogh\n\n"
        f"{LETTER}"
    )
    assert math.prompt == f"<image>\nWhat is the area of the triangle in ?\n{SHORT}"
    assert physics.prompt == f"<image>\n Which graph shows the velocity of the ball?\n(A) \n(B) \n\n{LETTER}"
    assert art.images == (images["validation_Art_Theory_1"],)
    assert art.system == "Answer the questions."
    assert art.reference == {
        "question_type": "multiple-choice",
        "answer": "B",
        "all_choices": ["A", "B", "C", "D"],
        "index2ans": {"A": "Claude Monet", "B": "Edgar Degas", "C": "Paul Cezanne", "D": "Vincent van Gogh"},
        "subject": "Art_Theory",
    }
    assert physics.reference["index2ans"] == {"A": "<image 2>", "B": "<image 3>"}
    assert score("mmmu", art, postprocess("mmmu", "(B) Edgar Degas\n\nThe dancers are typical of Degas.")) == 1.0
    assert score("mmmu", art, "A") == 0.0
    assert math.reference == {"question_type": "open", "answer": "6", "subject": "Math"}
    assert score("mmmu", math, "6") == 1.0
    assert score("mmmu", math, "7") == 0.0
    assert load_samples("mmmu", tmp_path / "Math" / "validation-00000-of-00001.parquet") == [math]
    assert load_samples("mmmu", tmp_path, limit=1) == [art]


def test_mmmu_jsonl_rows_without_pyarrow(tmp_path):
    rows = json.loads((FIXTURES / "mmmu" / "rows.json").read_text())
    with open(tmp_path / "mmmu_val.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "image_1": f"images/{row['id']}.png"}) + "\n")
            draw(tmp_path / "images" / f"{row['id']}.png")
    samples = load_samples("mmmu", tmp_path / "mmmu_val.jsonl")
    check_wellformed(samples)
    assert samples[0].prompt.startswith("<image>\nWho painted ?\n(A) Claude Monet\n")
    assert samples[2].prompt == f"<image>\n Which graph shows the velocity of the ball?\n(A) \n(B) \n\n{LETTER}"
    assert samples[1].images == (str(tmp_path / "images" / "validation_Math_3.png"),)
    assert score("mmmu", samples[0], "B") == 1.0
    assert score("mmmu", samples[0], "D") == 0.0

    rows[0]["question_type"] = "essay"
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "image_1": "x.png"}) + "\n")
    with pytest.raises(DataError, match="question_type 'essay'"):
        load_samples("mmmu", tmp_path / "bad.jsonl")


MATHVISTA_IMAGES = ["images/1.jpg", "images/2.png", "images/3.jpg"]
MATHVISTA_PROMPTS = [
    "<image>\nPlease answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
    "at the end.\nQuestion: What is the value of x?",
    f"<image>\nIs the bar for Norway taller than the bar for Chile?\nA. Yes\nB. No\n{LETTER}",
    "<image>\nPlease answer the question requiring a floating-point number with one decimal place and provide the "
    "final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the slope of the line?",
]


def check_mathvista(samples: list[Sample]) -> None:
    check_wellformed(samples)
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert [s.prompt for s in samples] == MATHVISTA_PROMPTS
    free, mc, flt = samples
    assert free.reference == {"question_type": "free_form", "answer": "5", "answer_type": "integer",
                              "precision": None, "unit": None, "task": "geometry problem solving"}  # fmt: skip
    assert mc.reference["answer"] == "B"  # the gold letter, as Megatron
    assert mc.reference["all_choices"] == ["A", "B"] and mc.reference["index2ans"] == {"A": "Yes", "B": "No"}
    assert flt.reference["precision"] == 1.0
    for protocol in ("nvlm", "official"):
        assert score("mathvista", free, "5", protocol) == 1.0
        assert score("mathvista", free, "6", protocol) == 0.0
        assert score("mathvista", mc, "B", protocol) == 1.0
        assert score("mathvista", mc, "A", protocol) == 0.0
        assert score("mathvista", flt, "1.5", protocol) == 1.0


def test_mathvista_json(bench):
    root = bench("mathvista", MATHVISTA_IMAGES)
    samples = load_samples("mathvista", root / "annot_testmini.json")
    check_mathvista(samples)
    assert samples[1].images == (str(root / "images" / "2.png"),)
    assert load_samples("mathvista", root) == samples


def test_mathvista_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = list(json.loads((FIXTURES / "mathvista" / "annot_testmini.json").read_text()).values())
    pngs = []
    for row in rows:
        pngs.append(image_bytes(row["pid"]))
        row["decoded_image"] = {"bytes": pngs[-1], "path": None}
        row["precision"] = float("nan") if row["precision"] is None else row["precision"]  # as HF stores it
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet")
    samples = load_samples("mathvista", tmp_path)
    check_mathvista(samples)
    assert [s.images for s in samples] == [(p,) for p in pngs]


# ----------------------------------------------------------------------------------------------------------------
# Text benchmarks


MMLU_PROMPT = (
    "The following is a multiple choice question about abstract algebra.\n\n"
    f"Find the order of the group Z_4 x Z_2.\nA. 4\nB. 6\nC. 8\nD. 2\n{LETTER}"
)


def test_mmlu_csv(bench):
    root = bench("mmlu")
    samples = load_samples("mmlu", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["abstract_algebra/0", "abstract_algebra/1", "anatomy/0"]
    s = samples[0]
    assert s.prompt == MMLU_PROMPT
    assert s.images == ()
    assert s.reference == {"answer": "C", "choices": ["4", "6", "8", "2"], "subject": "abstract_algebra"}
    assert score("mmlu", s, postprocess("mmlu", "C")) == 1.0
    assert score("mmlu", s, "**C**") == 1.0
    assert score("mmlu", s, "C. 8") == 0.0
    assert score("mmlu", s, "A") == 0.0


def test_mmlu_hf_rows(tmp_path):
    row = {"question": "Find the order of the group Z_4 x Z_2.", "subject": "abstract_algebra",
           "choices": ["4", "6", "8", "2"], "answer": 2}  # fmt: skip
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    [s] = load_samples("mmlu", tmp_path / "test.jsonl")
    assert (s.id, s.prompt, s.reference["answer"]) == ("abstract_algebra/0", MMLU_PROMPT, "C")

    (tmp_path / "bad.jsonl").write_text(json.dumps({**row, "answer": 7}) + "\n")
    with pytest.raises(DataError, match="answer 7 is neither"):
        load_samples("mmlu", tmp_path / "bad.jsonl")

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    hf = tmp_path / "hf"
    for folder in ("all", "abstract_algebra"):  # HF also has per-subject copies; only all/ is read
        (hf / folder).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([row]), hf / folder / "test-00000-of-00001.parquet")
    assert load_samples("mmlu", hf) == [s]


def test_gsm8k(bench):
    root = bench("gsm8k")
    samples = load_samples("gsm8k", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["0", "1"]
    s = samples[0]
    assert s.prompt == (
        "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?\n" + COT
    )
    assert s.max_new_tokens == 512 and s.images == ()
    assert s.reference["answer"].endswith("#### 26")
    reply = "He has 3 * 12 = 36 apples.\n\nThen 36 - 10 = 26.\n\nSo the answer is \\boxed{26}."
    assert score("gsm8k", s, postprocess("gsm8k", reply)) == 1.0
    assert score("gsm8k", s, "He has \\boxed{25}.") == 0.0

    lines = (root / "test.jsonl").read_text().splitlines()
    (root / "test.jsonl").write_text(lines[0].replace("#### 26", "26") + "\n")
    with pytest.raises(DataError, match="no '#### N'"):
        load_samples("gsm8k", root)


def test_math(bench, tmp_path):
    root = bench("math")
    samples = load_samples("math", root / "MATH")  # test/ only, numeric order inside a folder
    check_wellformed(samples)
    assert [s.id for s in samples] == ["algebra/1", "prealgebra/2", "prealgebra/10"]
    s = samples[0]
    assert s.prompt == "If $x + 2 = 5$, what is $x$?\n" + COT
    assert s.max_new_tokens == 1024
    assert s.reference == {"solution": "Subtracting 2 from both sides gives $x = \\boxed{3}$.", "type": "Algebra",
                           "level": "Level 1"}  # fmt: skip
    assert score("math", s, postprocess("math", "Subtract 2.\n\nSo $x = \\boxed{3}$.")) == 1.0
    assert score("math", s, "$\\boxed{4}$") == 0.0
    assert score("math", samples[1], "\\boxed{\\dfrac{3}{4}}") == 1.0

    rows = [{"problem": "Compute $1+1$.", "solution": "$\\boxed{2}$", "subject": "Prealgebra", "level": 1,
             "unique_id": "test/prealgebra/1.json"}]  # fmt: skip
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [m] = load_samples("math", tmp_path / "math500.jsonl")
    assert m.id == "test/prealgebra/1.json"
    assert m.reference == {"solution": "$\\boxed{2}$", "level": "1", "type": "Prealgebra"}


def test_humaneval(bench, tmp_path):
    root = bench("humaneval")
    samples = load_samples("humaneval", root)
    check_wellformed(samples)
    assert [s.id for s in samples] == ["HumanEval/0", "HumanEval/1"]
    s = samples[0]
    assert s.prompt == (
        "Complete the following Python function. Reply with the complete function in a single Python code block.\n\n"
        '```python\ndef add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n'
        '    """\n```'
    )
    assert set(s.reference) == {"task_id", "prompt", "test", "entry_point"}
    assert s.max_new_tokens == 1024
    right = "Sure.\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nThis returns the sum."
    wrong = "```python\ndef add(a: int, b: int) -> int:\n    return a - b\n```"
    assert score("humaneval", s, postprocess("humaneval", right)) == 1.0
    assert score("humaneval", s, postprocess("humaneval", wrong)) == 0.0

    gz = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write((root / "HumanEval.jsonl").read_text())
    assert load_samples("humaneval", gz) == samples
    gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read .*HumanEval\.jsonl\.gz"):
        load_samples("humaneval", gz)
