"""TextVQA (val) and VQAv2 loaders (EVAL.md §2; prompts SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Prompt: "<image>\\n{question}\\nAnswer the question using a single word or phrase." under "Answer the questions."
- TextVQA: `TextVQA_0.5.1_val.json` (the top-level "data" list is unwrapped). Images are "{image_id}" + ".jpg"
  (then ".png", as Megatron tries) in `train_images/`, `train_val_images/train_images/`, `images/` or beside the
  JSON. Id = `question_id`; reference `answers` = the 10 annotator answers.
- VQAv2, official pair: pass the questions file (`v2_OpenEnded_mscoco_val2014_questions.json`) or a directory
  holding it; the annotations file (`v2_mscoco_val2014_annotations.json`) is found beside it. Images are
  `COCO_{split}_{image_id:012d}.jpg` in `{split}/`, `images/{split}/`, `images/` or beside the JSON, where split is
  the questions file's `data_subtype` ("test-dev2015" -> "test2015"). A test split has no annotations; its samples
  carry `answers: []` (score 0 locally; for the EvalAI server only).
- VQAv2, Megatron's preprocessed list `[{image, question_id, question, answer: [10 strings]}]` (also `answers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from nvlm.eval.tasks.common import (
    IMAGE,
    SHORT_ANSWER,
    DataError,
    Sample,
    find_file,
    json_items,
    read_json,
    require,
    resolve_image,
)

TEXTVQA_FORMATS = "TextVQA_0.5.1_val.json (+ train_images/ with {image_id}.jpg), or a directory holding them"
VQAV2_FORMATS = (
    "v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json (+ <split>/ COCO images), "
    "a directory holding them, or Megatron's preprocessed JSON list [{image, question_id, question, answer}]"
)
_TEXTVQA_IMAGE_DIRS = ("train_images", "train_val_images/train_images", "images")


def vqa_prompt(question: str) -> str:
    return f"{IMAGE}\n{question}\n{SHORT_ANSWER}"


def _answers(value, where: str) -> list[str]:
    if not isinstance(value, list):
        raise DataError(f"{where}: 'answers' must be a list of strings")
    return [str(a) for a in value]


def _with_extensions(name: str) -> list[str]:
    return [name, name + ".jpg", name + ".png"]


def load_textvqa(path: Path) -> Iterator[Sample]:
    file = path if path.is_file() else find_file(path, ["TextVQA_0.5.1_val.json", "TextVQA_*.json"], "TextVQA")
    what = "TextVQA items {question_id, question, image_id, answers}"
    for i, item in enumerate(json_items(file, what)):
        where = f"{file}, item {i}"
        image_id = str(require(item, "image_id", where, what))
        yield Sample(
            id=str(require(item, "question_id", where, what)),
            prompt=vqa_prompt(str(require(item, "question", where, what))),
            images=(resolve_image(file.parent, _with_extensions(image_id), where, _TEXTVQA_IMAGE_DIRS),),
            reference={"answers": _answers(require(item, "answers", where, what), where)},
        )


# ----------------------------------------------------------------------------------------------------------------
# VQAv2


def _sibling(file: Path, kind: str) -> Path | None:
    """The other half of the official pair: questions <-> annotations, by the official names, else by glob."""
    name = file.name
    if kind == "annotations":
        guess = name.replace("OpenEnded_", "").replace("_questions", "_annotations")
    else:
        guess = name.replace("v2_mscoco_", "v2_OpenEnded_mscoco_").replace("_annotations", "_questions")
    if guess != name and (file.parent / guess).is_file():
        return file.parent / guess
    found = sorted(p for p in file.parent.glob(f"*{kind}*.json") if p != file)
    return found[0] if len(found) == 1 else None


def _official(questions_file: Path, questions: Mapping, annotations_file: Path | None) -> Iterator[Sample]:
    what = "VQAv2 questions {image_id, question, question_id}"
    subtype = str(questions.get("data_subtype") or "val2014")
    image_split = "test2015" if subtype.startswith("test") else subtype
    answers: dict | None = None
    if annotations_file is not None:
        data = read_json(annotations_file)
        if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
            raise DataError(f"{annotations_file}: expected VQAv2 annotations (an object with an 'annotations' list)")
        answers = {}
        for i, ann in enumerate(data["annotations"]):
            where = f"{annotations_file}, annotation {i}"
            qid = require(ann, "question_id", where)
            answers[qid] = [str(require(a, "answer", where)) for a in require(ann, "answers", where)]
    elif not subtype.startswith("test"):
        raise DataError(
            f"{questions_file}: no annotations file beside it (expected e.g. v2_mscoco_{subtype}_annotations.json)"
        )

    for i, q in enumerate(questions["questions"]):
        where = f"{questions_file}, question {i}"
        qid = require(q, "question_id", where, what)
        image_id = int(require(q, "image_id", where, what))
        if answers is not None and qid not in answers:
            raise DataError(f"{where}: question_id {qid} has no entry in {annotations_file}")
        image = f"COCO_{image_split}_{image_id:012d}.jpg"
        subdirs = (image_split, f"images/{image_split}", "images")
        yield Sample(
            id=str(qid),
            prompt=vqa_prompt(str(require(q, "question", where, what))),
            images=(resolve_image(questions_file.parent, image, where, subdirs),),
            reference={"answers": answers[qid] if answers is not None else []},
        )


def _megatron_list(file: Path, items: list) -> Iterator[Sample]:
    what = "Megatron VQAv2 items {image, question_id, question, answer}"
    for i, item in enumerate(items):
        where = f"{file}, item {i}"
        gold = item.get("answer", item.get("answers")) if isinstance(item, Mapping) else None
        if gold is None:
            raise DataError(f"{where}: missing field 'answer' (expected {what})")
        yield Sample(
            id=str(require(item, "question_id", where, what)),
            prompt=vqa_prompt(str(require(item, "question", where, what))),
            images=(resolve_image(file.parent, _with_extensions(str(require(item, "image", where, what))), where,
                                  ("images",)),),
            reference={"answers": _answers(gold if isinstance(gold, list) else [gold], where)},
        )


def load_vqav2(path: Path) -> Iterator[Sample]:
    file = path if path.is_file() else find_file(path, ["*_questions.json", "*questions*.json"], "VQAv2 questions")
    data = read_json(file)
    if isinstance(data, Mapping) and isinstance(data.get("annotations"), list):  # given the other half
        other = _sibling(file, "questions")
        if other is None:
            raise DataError(f"{file}: this is an annotations file and no questions file was found beside it")
        file, data = other, read_json(other)
    if isinstance(data, Mapping) and isinstance(data.get("questions"), list):
        yield from _official(file, data, _sibling(file, "annotations"))
    elif isinstance(data, list):
        yield from _megatron_list(file, data)
    else:
        raise DataError(f"{file}: expected {VQAV2_FORMATS}")
