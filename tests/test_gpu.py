"""CUDA checks (marked `gpu`; skipped without CUDA): the same checkpoint gives the same answers on GPU as on CPU,
in float32 and bfloat16, on one device and spread over all GPUs with a device map."""

import pytest
import torch

from nvlm.cli import main

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "tiny"
    assert main(["init", str(out), "--preset", "tiny", "--std", "0.3", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (500, 300), "white")
    ImageDraw.Draw(img).ellipse((20, 20, 200, 200), fill="red")
    path = tmp_path_factory.mktemp("gpu-img") / "a.png"
    img.save(path)
    return path


def test_cuda_float32_matches_cpu(ckpt, image):
    import nvlm

    cpu = nvlm.load(ckpt, device="cpu", dtype="float32")
    gpu = nvlm.load(ckpt, device="cuda", dtype="float32")
    a = cpu.chat("Describe", image, max_new_tokens=12, logprobs=3)
    b = gpu.chat("Describe", image, max_new_tokens=12, logprobs=3)
    assert a.output_token_ids == b.output_token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert all(abs(u - v) < 1e-3 for (_, u), (_, v) in zip(x, y))


def test_cuda_bfloat16_runs_and_batches(ckpt, image):
    import nvlm

    pipe = nvlm.load(ckpt, device="cuda")  # bfloat16 by default on CUDA
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    outs = pipe.generate(["Describe", "Hi"], [[image], []], max_new_tokens=8)
    assert all(len(o.output_token_ids) >= 1 for o in outs)


def test_device_map_split_matches_single_device(ckpt, image):
    import nvlm

    one = nvlm.load(ckpt, device="cuda", dtype="float32")
    spread = nvlm.load(ckpt, device="cuda", dtype="float32", device_map="split")
    assert spread.chat("Describe", image, max_new_tokens=8).output_token_ids == \
        one.chat("Describe", image, max_new_tokens=8).output_token_ids
