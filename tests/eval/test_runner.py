"""The evaluation runner (`run_benchmark`), its endpoint client, the report and the `nvlm eval run/report` CLI.

The task layer (`nvlm.eval.tasks`) is replaced by a small stand-in that follows its contract (Sample,
load_samples, postprocess), so these tests pin the runner's behaviour and not any benchmark's prompt. Generation
runs on a tiny random `nvlm init` checkpoint, on a counting fake pipeline, or against tests/eval/stub_server.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from nvlm.eval import runner
from nvlm.eval.endpoint import ChatClient, EndpointError, build_messages, chat_completions_url, image_data_url
from nvlm.eval.report import write_report
from stub_server import StubServer, user_text

HERE = Path(__file__).parent
RED = ["red"] * 10
BLUE = ["blue"] * 10


# ---- a stand-in for nvlm.eval.tasks ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    images: tuple = ()
    reference: dict = field(default_factory=dict)
    system: str | None = "Answer the questions."
    max_new_tokens: int = 128


def samples_from_json(path, limit=None) -> list[Sample]:
    items = json.loads(Path(path).read_text())
    samples = [Sample(id=it["id"], prompt=it["prompt"], images=tuple(it.get("images", ())),
                      reference={"answers": it["answers"]}, max_new_tokens=it.get("max_new_tokens", 8))
               for it in items]
    return samples if limit is None else samples[:limit]


def first_line(benchmark, text, protocol="nvlm"):
    """The NVLM-1.0 tag's post-processing (EVAL §1): first paragraph, then its first line."""
    return text.strip().split("\n\n")[0].split("\n")[0].strip() if protocol == "nvlm" else text.strip()


def use_samples(monkeypatch, samples):
    def load(benchmark, data, *, limit=None):
        assert benchmark == "textvqa"
        return list(samples) if limit is None else list(samples)[:limit]

    monkeypatch.setattr(runner, "load_samples", load)
    monkeypatch.setattr(runner, "postprocess", first_line)


def draw(path: Path, colour: str, size=(160, 96)) -> str:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle((20, 20, size[0] - 20, size[1] - 20), fill=colour)
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return {"red": draw(d / "red.png", "red"), "blue": draw(d / "blue.png", "blue", (96, 160))}


def six_samples(images) -> list[Sample]:
    return [
        Sample("q0", "<image>\nWhat colour is the box?", (images["red"],), {"answers": RED}, max_new_tokens=4),
        Sample("q1", "What colour is the box?", (images["blue"],), {"answers": BLUE}, max_new_tokens=6),
        Sample("q2", "Image-1: <image>\nImage-2: <image>\nWhich colour is on the left?",
               (images["red"], images["blue"]), {"answers": RED}, max_new_tokens=4),
        Sample("q3", "Name a colour.", (), {"answers": RED}, system=None, max_new_tokens=6),
        Sample("q4", "<image>\nIs it red?", (images["red"],), {"answers": ["yes"] * 10}, max_new_tokens=4),
        Sample("q5", "<image>\nIs this one red?", (images["blue"],), {"answers": ["no"] * 10}, max_new_tokens=4),
    ]


def read_lines(path) -> list[dict]:
    text = Path(path).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# ---- local generation on a tiny checkpoint ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    import nvlm
    from nvlm.cli import main

    ckpt = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert main(["init", str(ckpt), "--preset", "tiny", "--seed", "3", "--std", "0.3"]) == 0
    return nvlm.load(ckpt, device="cpu", dtype="float32")


class Counting:
    """Wraps a pipeline and records how many prompts reach `generate_prepared` per call."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.path = pipe, [], getattr(pipe, "path", None)

    def prepare(self, *args, **kw):
        return self.pipe.prepare(*args, **kw)

    def generate_prepared(self, prepared, params):
        self.calls.append((len(prepared), params.max_new_tokens, params.temperature))
        return self.pipe.generate_prepared(prepared, params)


def test_local_run_writes_predictions_score_and_report(tmp_path, monkeypatch, images, tiny_pipe):
    samples = six_samples(images)
    use_samples(monkeypatch, samples)
    pipe = Counting(tiny_pipe)
    result = runner.run_benchmark("textvqa", "unused", model=pipe, out_dir=tmp_path, batch_size=2, max_tiles=2,
                                  progress=False)
    assert result["benchmark"] == "textvqa" and result["protocol"] == "nvlm"
    assert result["n"] == 6 and result["generated"] == 6 and 0.0 <= result["score"] <= 100.0
    # Grouped by max_new_tokens (4: q0 q2 q4 q5; 6: q1 q3), at most 2 per batch, always greedy.
    assert pipe.calls == [(2, 4, 0.0), (2, 4, 0.0), (2, 6, 0.0)]

    records = read_lines(tmp_path / "textvqa.predictions.jsonl")
    assert sorted(r["id"] for r in records) == [s.id for s in samples]
    by_id = {r["id"]: r for r in records}
    for s in samples:
        r = by_id[s.id]
        assert list(r)[:3] == ["id", "prediction", "raw_prediction"] and r["answers"] == s.reference["answers"]
        assert r["prediction"] == first_line("textvqa", r["raw_prediction"])
        # The runner passes each sample's prompt, images, system, tile limit and budget through unchanged.
        alone = tiny_pipe.chat(s.prompt, list(s.images), system=s.system, max_tiles=2,
                               max_new_tokens=s.max_new_tokens)
        assert r["raw_prediction"] == alone.text

    saved = json.loads((tmp_path / "textvqa.score.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "generated"}
    assert saved["model"] == "ckpt"
    per_sample = read_lines(tmp_path / "textvqa.per_sample.jsonl")
    assert [r["id"] for r in per_sample] == [s.id for s in samples] and all("score" in r for r in per_sample)

    report = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert report["scores"]["textvqa"]["n"] == 6
    assert f"| ckpt | – | – | – | – | – | – | {saved['score']:.1f} | – | – |" in md
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "ckpt"


def test_cli_local_run_with_the_real_textvqa_task(tmp_path, tiny_pipe, capsys):
    """`nvlm eval run textvqa --model DIR` end to end: the real loader, prompt and post-processing."""
    from nvlm.cli import main

    items = []
    for i, colour in enumerate(("red", "blue", "green")):
        draw(tmp_path / f"img{i}.jpg", colour)
        items.append({"question_id": 100 + i, "image_id": f"img{i}", "question": "What colour is the box?",
                      "answers": [colour] * 10})
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": items}))
    out = tmp_path / "runs"
    args = ["eval", "run", "textvqa", "--data", str(tmp_path), "--model", str(tiny_pipe.path), "--out", str(out),
            "--limit", "2", "--max-tiles", "1", "--dtype", "float32", "--device", "cpu", "--no-progress", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["generated"] == 2 and result["model"] == "ckpt"
    records = read_lines(out / "textvqa.predictions.jsonl")
    assert [r["id"] for r in records] == ["100", "101"] and records[0]["answers"] == ["red"] * 10
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["generated"] == 0


# ---- resume ----------------------------------------------------------------------------------------------------

class FakePipe:
    """Deterministic answers from the prompt; counts the prompts it generates for."""

    path = None

    def __init__(self):
        self.generated: list[str] = []

    def prepare(self, prompt, images, *, system=None, max_tiles=None):
        return prompt

    def generate_prepared(self, prepared, params):
        self.generated += list(prepared)
        return [type("C", (), {"text": f"answer to {p!r}\nsecond line"})() for p in prepared]


def test_resume_after_crash_generates_only_missing_ids(tmp_path, monkeypatch, images):
    samples = six_samples(images)
    use_samples(monkeypatch, samples)
    path = tmp_path / "textvqa.predictions.jsonl"

    first = FakePipe()
    result = runner.run_benchmark("textvqa", "d", model=first, out_dir=tmp_path, limit=3, progress=False)
    assert result["n"] == 3 and len(first.generated) == 3
    assert [r["id"] for r in read_lines(path)] == ["q0", "q2", "q1"]  # grouped by budget

    # A crash: q0 and q2 were written completely, q1's line was cut half-way (no newline).
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1] + lines[2][:25])
    second = FakePipe()
    result = runner.run_benchmark("textvqa", "d", model=second, out_dir=tmp_path, progress=False)
    assert result["n"] == 6 and result["generated"] == 4
    assert sorted(second.generated) == sorted(s.prompt for s in samples if s.id not in ("q0", "q2"))
    ids = [r["id"] for r in read_lines(path)]  # every line parses: the fragment is gone
    assert len(ids) == len(set(ids)) and sorted(ids) == [s.id for s in samples]

    third = FakePipe()
    again = runner.run_benchmark("textvqa", "d", model=third, out_dir=tmp_path, progress=False)
    assert third.generated == [] and again["generated"] == 0 and again["score"] == result["score"]

    # A smaller limit scores only the requested ids; the extra lines stay in the file.
    small = runner.run_benchmark("textvqa", "d", model=FakePipe(), out_dir=tmp_path, limit=2, progress=False)
    assert small["n"] == 2 and len(read_lines(path)) == 6


def test_malformed_complete_line_is_an_error_not_silently_dropped(tmp_path, monkeypatch, images):
    use_samples(monkeypatch, six_samples(images))
    (tmp_path / "textvqa.predictions.jsonl").write_text('{"id": "q0", "raw_prediction": "red"}\n{oops\n')
    with pytest.raises(ValueError, match=r"line 2: malformed JSON"):
        runner.run_benchmark("textvqa", "d", model=FakePipe(), out_dir=tmp_path, progress=False)


def test_rescoring_uses_raw_prediction_under_the_requested_protocol(tmp_path, monkeypatch):
    samples = [Sample("a", "q", (), {"answers": RED}), Sample("b", "q", (), {"answers": BLUE})]
    use_samples(monkeypatch, samples)
    lines = [{"id": "a", "prediction": "stale", "raw_prediction": "red\nbecause it is red"},
             {"id": "b", "prediction": "stale", "raw_prediction": "blue"}]
    (tmp_path / "textvqa.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    pipe = FakePipe()
    nvlm_proto = runner.run_benchmark("textvqa", "d", model=pipe, out_dir=tmp_path, progress=False)
    official = runner.run_benchmark("textvqa", "d", model=pipe, out_dir=tmp_path, protocol="official",
                                    progress=False)
    assert pipe.generated == []
    assert nvlm_proto["score"] == 100.0  # first line "red" matches
    assert official["score"] == 50.0  # the stand-in keeps the whole reply under `official`


# ---- sharding --------------------------------------------------------------------------------------------------

def test_two_ranks_then_merge_equals_a_single_run(tmp_path, monkeypatch, images):
    samples = six_samples(images)
    use_samples(monkeypatch, samples)
    single = runner.run_benchmark("textvqa", "d", model=FakePipe(), out_dir=tmp_path / "single", progress=False)

    out = tmp_path / "sharded"
    p0, p1 = FakePipe(), FakePipe()
    r0 = runner.run_benchmark("textvqa", "d", model=p0, out_dir=out, rank=0, world_size=2, progress=False)
    assert r0["complete"] is False and r0["missing"] == 3  # rank 1 has not run yet: no merge, no score
    assert not (out / "textvqa.score.json").exists()
    r1 = runner.run_benchmark("textvqa", "d", model=p1, out_dir=out, rank=1, world_size=2, progress=False)
    assert r1 == {"benchmark": "textvqa", "rank": 1, "world_size": 2, "generated": 3, "complete": False}
    assert sorted(p0.generated + p1.generated) == sorted(s.prompt for s in samples)
    assert {r["id"] for r in read_lines(out / "textvqa.predictions.rank1.jsonl")} == {"q1", "q3", "q5"}

    # Rank 1 also answered q0 (as after a changed world size): the first occurrence, rank 0's, must win.
    with open(out / "textvqa.predictions.rank1.jsonl", "a") as f:
        f.write(json.dumps({"id": "q0", "prediction": "dup", "raw_prediction": "dup", "answers": RED}) + "\n")
    again = FakePipe()
    merged = runner.run_benchmark("textvqa", "d", model=again, out_dir=out, rank=0, world_size=2, progress=False)
    assert again.generated == [] and merged["generated"] == 0
    records = read_lines(out / "textvqa.predictions.jsonl")
    assert sorted(r["id"] for r in records) == sorted(s.id for s in samples)
    assert next(r for r in records if r["id"] == "q0")["raw_prediction"] != "dup"
    assert not list(out.glob("*.rank*.jsonl"))
    assert {k: merged[k] for k in ("n", "score")} == {k: single[k] for k in ("n", "score")}


def test_rank_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runner.resolve_rank() == (3, 4)
    assert runner.resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        runner.resolve_rank(4, 4)


_RANK_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from nvlm.eval import runner
from test_runner import first_line, samples_from_json
runner.load_samples = lambda benchmark, data, limit=None: samples_from_json(data, limit)
runner.postprocess = first_line
from nvlm.cli import main
sys.exit(main(["eval", "run", "textvqa", "--data", {data!r}, "--endpoint", {url!r}, "--api-model", "stub-model",
               "--out", {out!r}, "--no-progress", "--json"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_ranks_meet_at_a_gloo_barrier(tmp_path, images):
    items = [{"id": f"s{i}", "prompt": f"<image>\nquestion {i}", "images": [images["red"]],
              "answers": RED} for i in range(5)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "out"
    with StubServer(lambda body: "red" if "question 1" in user_text(body) else "green") as server:
        script = _RANK_SCRIPT.format(here=str(HERE), data=str(data), url=server.url, out=str(out))
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # do not depend on the hostname resolving
        procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == ""  # rank 1 prints nothing on stdout
    result = json.loads(outs[1][0])
    assert result["n"] == 5 and result["score"] == pytest.approx(20.0)
    assert len(server.answered) == 5
    assert sorted(r["id"] for r in read_lines(out / "textvqa.predictions.jsonl")) == [it["id"] for it in items]
    assert not list(out.glob("*.rank*.jsonl"))


# ---- endpoint --------------------------------------------------------------------------------------------------

def colour_responder(body) -> str:
    """'red' for questions about red boxes (by the first image's pixels), else 'blue'; with a second line."""
    parts = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(parts, str):
        return "red\nno image"
    url = parts[0]["image_url"]["url"]
    pixel = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").getpixel((80, 48))
    return ("red" if pixel == (255, 0, 0) else "blue") + "\n\nexplanation"


def test_endpoint_run_sends_openai_payloads(tmp_path, monkeypatch, images):
    jpeg = io.BytesIO()
    Image.open(images["blue"]).convert("RGB").save(jpeg, format="JPEG")
    samples = six_samples(images)
    samples[1] = Sample("q1", "And this box?", (jpeg.getvalue(),), {"answers": BLUE}, max_new_tokens=6)
    use_samples(monkeypatch, samples)
    with StubServer(colour_responder, api_key="sekrit") as server:
        result = runner.run_benchmark("textvqa", "d", endpoint=server.url + "/v1/", api_model="stub-model",
                                      api_key="sekrit", out_dir=tmp_path, concurrency=3, progress=False)
    # q4 expects "yes" and q5 "no": the stub says a colour, so 4 of 6 are right.
    assert result["n"] == 6 and result["score"] == pytest.approx(400 / 6) and result["model"] == "stub-model"
    assert len(server.requests) == 6
    by_text = {user_text(r["body"]): r for r in server.requests}
    for s in samples:
        req = by_text[s.prompt.replace("<image>\n", "")]
        body = req["body"]
        assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sekrit"
        assert body["model"] == "stub-model" and body["temperature"] == 0 and body["top_p"] == 1.0
        assert body["max_tokens"] == s.max_new_tokens
        system = [m["content"] for m in body["messages"] if m["role"] == "system"]
        assert system == ([s.system] if s.system else [])
        content = body["messages"][-1]["content"]
        if not s.images:
            assert content == s.prompt
            continue
        assert [p["type"] for p in content] == ["image_url"] * len(s.images) + ["text"]
        for part, image in zip(content, s.images):
            head, b64 = part["image_url"]["url"].split(",", 1)
            raw = image if isinstance(image, bytes) else Path(image).read_bytes()
            assert head == ("data:image/jpeg;base64" if isinstance(image, bytes) else "data:image/png;base64")
            assert base64.b64decode(b64) == raw
        assert "<image>" not in content[-1]["text"]
    assert by_text["Image-1: Image-2: Which colour is on the left?"]
    records = {r["id"]: r for r in read_lines(tmp_path / "textvqa.predictions.jsonl")}
    assert records["q0"]["raw_prediction"] == "red\n\nexplanation" and records["q0"]["prediction"] == "red"


def test_endpoint_retries_503_then_succeeds(tmp_path, monkeypatch, images):
    use_samples(monkeypatch, six_samples(images)[:2])
    with StubServer(colour_responder, fail_first=2) as server:
        client = ChatClient(server.url, "stub-model", retries=3, backoff=0.01)
        result = runner.run_benchmark("textvqa", "d", endpoint=client, out_dir=tmp_path, concurrency=1,
                                      progress=False)
    assert [r["status"] for r in server.requests] == [503, 503, 200, 200]
    assert result["n"] == 2 and result["score"] == 100.0


def test_endpoint_gives_up_after_retries_and_keeps_finished_answers(tmp_path, monkeypatch, images):
    use_samples(monkeypatch, six_samples(images)[:3])
    with StubServer(colour_responder, fail_if=lambda body: "Which colour" in user_text(body)) as server:
        client = ChatClient(server.url, "stub-model", retries=2, backoff=0.0)
        with pytest.raises(EndpointError, match=r"sample 'q2'.*gave up after 3 attempts.*HTTP 503: server busy"):
            runner.run_benchmark("textvqa", "d", endpoint=client, out_dir=tmp_path, concurrency=1, progress=False)
    assert [r["status"] for r in server.requests] == [200, 200, 503, 503, 503]
    assert [r["id"] for r in read_lines(tmp_path / "textvqa.predictions.jsonl")] == ["q0", "q1"]
    assert not (tmp_path / "textvqa.score.json").exists()
    with StubServer(colour_responder) as server:  # the server recovered: only q2 is asked again
        result = runner.run_benchmark("textvqa", "d", endpoint=server.url, api_model="stub-model",
                                      out_dir=tmp_path, progress=False)
    assert len(server.requests) == 1 and result["n"] == 3 and result["generated"] == 1


def test_endpoint_client_error_names_the_server_message_without_retrying(tmp_path, monkeypatch, images):
    use_samples(monkeypatch, six_samples(images)[:1])
    with StubServer() as server:
        with pytest.raises(EndpointError, match=r"HTTP 404: The model `nope` does not exist"):
            runner.run_benchmark("textvqa", "d", endpoint=server.url, api_model="nope", out_dir=tmp_path,
                                 progress=False)
        assert len(server.requests) == 1
    assert not (tmp_path / "textvqa.score.json").exists()


def test_endpoint_connection_refused_is_retried_then_reported():
    port = _free_port()  # nothing listens there any more
    client = ChatClient(f"http://127.0.0.1:{port}", "m", retries=1, backoff=0.0, timeout=5)
    with pytest.raises(EndpointError, match="gave up after 2 attempts"):
        client.complete("hi")


def test_message_building_rules(images):
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    msgs = build_messages("<image>\nA<image>B", [images["red"], images["blue"]], "sys")
    assert msgs[0] == {"role": "system", "content": "sys"}
    assert [p["type"] for p in msgs[1]["content"]] == ["image_url", "image_url", "text"]
    assert msgs[1]["content"][-1]["text"] == "AB"
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        build_messages("<image><image>", [images["red"]])
    # A format with no passthrough MIME type (TIFF) is re-encoded as PNG.
    tiff = io.BytesIO()
    Image.open(images["red"]).save(tiff, format="TIFF")
    assert image_data_url(tiff.getvalue()).startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="cannot read image"):
        image_data_url(b"not an image")


# ---- report and CLI --------------------------------------------------------------------------------------------

def test_report_layout_with_missing_benchmarks(tmp_path):
    for bench, score, n in (("ocrbench", 612.0, 1000), ("chartqa", 71.234, 2500), ("gsm8k", 55.55, 1319)):
        (tmp_path / f"{bench}.score.json").write_text(json.dumps(
            {"benchmark": bench, "protocol": "nvlm", "n": n, "score": score, "model": "my-model"}))
    report = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| Model | MMMU | MathVista | OCRBench | AI2D | ChartQA | DocVQA | TextVQA | RealWorldQA | VQAv2 |" in md
    assert "| Model | MMLU | GSM8K | MATH | HumanEval |" in md
    assert "| my-model | – | – | 612 | – | 71.2 | – | – | – | – |" in md
    assert "| my-model | – | 55.5 | – | – |" in md or "| my-model | – | 55.6 | – | – |" in md
    assert "| NVLM-D 1.0 72B (model card, Megatron) | 59.7 | 65.2 | 853 |" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["scores"]["ocrbench"] == {"score": 612.0, "n": 1000, "protocol": "nvlm"}
    assert saved == {k: v for k, v in report.items() if k not in ("markdown", "paths")}


def test_cli_run_and_report(tmp_path, monkeypatch, images, capsys):
    from nvlm.cli import main

    use_samples(monkeypatch, six_samples(images)[:4])
    out = tmp_path / "runs"
    with StubServer(colour_responder) as server:
        rc = main(["eval", "run", "textvqa", "--data", "d", "--endpoint", server.url, "--api-model", "stub-model",
                   "--out", str(out), "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["n"] == 4 and result["score"] == 100.0 and result["generated"] == 4

    assert main(["eval", "report", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| stub-model | – | – | – | – | – | – | 100.0 | – | – |" in captured.out
    assert (out / "report.md").read_text() == captured.out


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    from nvlm.cli import main

    assert main(["eval", "run", "textvqa", "--data", "d", "--endpoint", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-model" in err
    assert main(["eval", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no *.score.json" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "run", "textvqa", "--data", "d", "--model", "m", "--endpoint", "http://x"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["eval", "run", "textvqa", "--data", "d"])  # neither --model nor --endpoint
