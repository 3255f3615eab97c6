"""Pipeline proof (issue 3, target a): a from-scratch tiny model memorises 256 synthetic image questions to >= 95%
exact match within 5 minutes of CPU training, and its accuracy collapses when the images are shuffled among the
questions, so the image really reaches the decoder. Runs benchmarks/overfit_proof.py (about 1.5 minutes)."""

from __future__ import annotations

import pytest
from scripts import load_script


def _proof_module():
    return load_script("benchmarks/overfit_proof.py")


def test_derangement_moves_every_image():
    perm = _proof_module().derangement(256, seed=0)
    assert sorted(perm) == list(range(256)) and all(p != i for i, p in enumerate(perm))


@pytest.mark.slow
def test_overfits_256_samples_and_needs_the_image(tmp_path):
    mod = _proof_module()
    res = mod.run_proof(tmp_path, n=256, steps=600, threads=2)
    mod.print_table(res)
    assert res["n"] == 256
    assert res["train_s"] <= 300, f"training took {res['train_s']} s (budget: 5 minutes on 2 cores)"
    assert res["accuracy"] >= 0.95, res
    # Shuffled images: far below the memorised accuracy and no better than an image-blind model could do.
    assert res["shuffled_accuracy"] <= res["accuracy"] - 0.3, res
    assert res["shuffled_accuracy"] <= res["question_only_accuracy"] + 0.05, res
    # The image carries the answer for every question type, not just some.
    for t, r in res["per_type"].items():
        assert r["accuracy"] >= 0.9, (t, r)
        assert r["shuffled_accuracy"] <= r["accuracy"] - 0.15, (t, r)
