"""End to end: `nvlm init` a tiny checkpoint (official layout, real Qwen2 vocabulary) -> `nvlm chat --json` on an
image -> the JSON contract; the Python API; the checkpoint reloads after save with identical outputs."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from nvlm.cli import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    img = Image.new("RGB", (640, 480), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((50, 50, 250, 250), fill="red")
    d.rectangle((350, 200, 600, 420), fill="blue")
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    img.save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, qwen_tokenizer_dir):
    out = tmp_path_factory.mktemp("e2e") / "tiny"
    assert main(["init", str(out), "--preset", "tiny", "--tokenizer", str(qwen_tokenizer_dir), "--seed", "7",
                 "--std", "0.3", "--max-shard-mb", "20"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(ckpt):
    import nvlm

    return nvlm.load(ckpt, device="cpu", dtype="float32")


def chat_json(capsys, ckpt, *args):
    capsys.readouterr()
    rc = main(["chat", "--model", str(ckpt), "--json", "--temperature", "0", "--dtype", "float32", *args])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


def test_init_writes_the_official_layout(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    assert any(n.startswith("model-00001-of-") for n in names)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "NVLM_D" and cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["llm_config"]["vocab_size"] >= 151665


def test_chat_json_contract(capsys, ckpt, image_path, pipe, qwen_tokenizer):
    res = chat_json(capsys, ckpt, "--image", str(image_path), "--max-tiles", "6", "--max-new-tokens", "5",
                    "--logprobs", "3", "How many circles are there?")
    assert set(res) >= {"text", "prompt_token_ids", "output_token_ids", "logprobs", "num_tiles"}
    # 640x480 (aspect 4:3) with at most 6 tiles: 3x2 is the closest grid (|4/3 - 3/2| = 1/6), + thumbnail = 7.
    assert res["num_tiles"] == [7]
    ids = res["prompt_token_ids"]
    tok = qwen_tokenizer
    per_tile = pipe.config.tokens_per_tile
    assert ids.count(tok.vision_pad_id) == 7 * per_tile
    assert ids[:3] == [tok.im_start_id, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [tok.im_start_id, 77091, 198]  # <|im_start|> assistant \n
    assert tok.decode(ids, skip_special_tokens=False).count("<tile_") == 7
    out = res["output_token_ids"]
    assert 1 <= len(out) <= 5 and all(0 <= t < len(tok) for t in out)
    assert len(res["logprobs"]) == len(out)
    # Logprobs and greedy choices against an independent full forward pass over prompt + output.
    prepared = pipe.prepare("How many circles are there?", [image_path], max_tiles=6)
    assert prepared.input_ids == ids
    with torch.no_grad():
        logits = pipe.model(torch.tensor([ids + out]), pixel_values=prepared.pixel_values)[0]
    for step, top in enumerate(res["logprobs"]):
        ref = logits[len(ids) - 1 + step, :len(tok)].log_softmax(-1)
        assert [e["logprob"] for e in top] == sorted((e["logprob"] for e in top), reverse=True)
        assert top[0]["token_id"] == out[step] == int(ref.argmax())
        for e in top:
            assert abs(e["logprob"] - float(ref[e["token_id"]])) < 1e-4
    assert res["text"] == tok.decode([t for t in out if t not in tok.stop_ids])


def test_chat_json_text_only_and_tile_limit(capsys, ckpt, image_path):
    res = chat_json(capsys, ckpt, "--max-new-tokens", "3", "Hello!")
    assert res["num_tiles"] == [] and res["logprobs"] is None
    # At most 2 tiles: 1x1 (diff 1/3) beats 2x1 (diff 2/3) -> a single tile and no thumbnail.
    res = chat_json(capsys, ckpt, "--image", str(image_path), "--max-tiles", "2", "--max-new-tokens", "2", "Hi")
    assert res["num_tiles"] == [1]


def test_two_images(capsys, ckpt, image_path):
    res = chat_json(capsys, ckpt, "--image", str(image_path), "--image", str(image_path), "--max-tiles", "2",
                    "--max-new-tokens", "2", "Compare")
    assert res["num_tiles"] == [1, 1]


def test_bad_inputs_give_one_line_errors(capsys, ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    capsys.readouterr()
    assert main(["chat", "--model", str(ckpt), "--image", str(bad), "--json", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvlm: error:") and "bad.png" in err and "Traceback" not in err
    assert main(["chat", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_api_stream_and_batch_agree_with_chat(pipe, image_path):
    q = "What colour is the square?"
    single = pipe.chat(q, image_path, max_new_tokens=8)
    assert "".join(pipe.stream(q, image_path, max_new_tokens=8)) == single.text
    batch = pipe.generate([q, "Say hi", q], [[image_path], [], [image_path]], max_new_tokens=8)
    assert batch[0].output_token_ids == single.output_token_ids == batch[2].output_token_ids
    assert batch[1].output_token_ids == pipe.chat("Say hi", max_new_tokens=8).output_token_ids
    # multi-turn history lands in the prompt
    follow = pipe.prepare("And the circle?", [image_path], history=[("<image>\n" + q, single.text)])
    assert follow.input_ids[:len(pipe.prepare(q, [image_path]).input_ids) - 3] == \
        pipe.prepare(q, [image_path]).input_ids[:-3]


def test_reload_after_save_gives_identical_outputs(pipe, image_path, tmp_path):
    from nvlm.weights import save_checkpoint

    import nvlm

    save_checkpoint(pipe.model, tmp_path / "copy", tokenizer=pipe.tokenizer)
    again = nvlm.load(tmp_path / "copy", device="cpu", dtype="float32")
    a = pipe.chat("Describe", image_path, max_new_tokens=6, logprobs=2)
    b = again.chat("Describe", image_path, max_new_tokens=6, logprobs=2)
    assert a.output_token_ids == b.output_token_ids
    # Same ids; logprobs equal to fp32 rounding (a GEMM's summation order may follow the weights' memory alignment,
    # which differs between the memory-mapped original and the reloaded copy).
    for pos_a, pos_b in zip(a.logprobs, b.logprobs, strict=True):
        assert [t for t, _ in pos_a] == [t for t, _ in pos_b]
        assert [lp for _, lp in pos_a] == pytest.approx([lp for _, lp in pos_b], abs=1e-5)


def test_console_script_runs(ckpt, image_path):
    out = subprocess.run([sys.executable, "-m", "nvlm", "chat", "--model", str(ckpt), "--image", str(image_path),
                          "--max-new-tokens", "2", "--json", "hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["num_tiles"] == [7]


def test_interactive_chat_multi_turn(ckpt, image_path, tmp_path):
    script = "\n".join([f"/image {image_path}", "How many?", "/image /nonexistent.png", "And now?", "/reset",
                        "Hello", "/exit"]) + "\n"
    out = subprocess.run([sys.executable, "-m", "nvlm", "chat", "--model", str(ckpt), "--max-new-tokens", "3",
                          "--max-tiles", "2"], input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(image attached:" in out.stderr and "/nonexistent.png" in out.stderr
    assert "(conversation cleared)" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.count(">>> ") == 7  # one prompt per input line


def test_bfloat16_on_cpu(ckpt, image_path):
    import nvlm

    pipe = nvlm.load(ckpt, device="cpu", dtype="bfloat16")
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    r = pipe.chat("Describe", image_path, max_new_tokens=4)
    assert 1 <= len(r.output_token_ids) <= 4 and all(t < len(pipe.tokenizer) for t in r.output_token_ids)


def test_quantized_checkpoint_and_chat_flag(capsys, ckpt, image_path, tmp_path):
    import nvlm
    from nvlm.quantize import Int8WeightOnlyLinear

    assert main(["quantize", str(ckpt), str(tmp_path / "q8"), "--mode", "int8"]) == 0
    pipe = nvlm.load(tmp_path / "q8", device="cpu")
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in pipe.model.modules())
    assert pipe.config.extra["quantization_config"]["mode"] == "int8"
    r = pipe.chat("Describe", image_path, max_new_tokens=4)
    assert 1 <= len(r.output_token_ids) <= 4 and all(t < len(pipe.tokenizer) for t in r.output_token_ids)
    res = chat_json(capsys, ckpt, "--quantize", "int8", "--dtype", "bfloat16", "--image", str(image_path),
                    "--max-new-tokens", "3", "Hi")
    assert res["num_tiles"] == [7] and 1 <= len(res["output_token_ids"]) <= 3
