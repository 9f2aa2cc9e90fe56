"""The weights fingerprint (issue 15): full by default for models that are cheap to hash, a sampled
mode for very large ones that still sees a changed header, size or sampled block."""

from __future__ import annotations

import shutil

import pytest

from conftest import MODEL
from dpocli.errors import DpocliError
from dpocli.model import load as modeling


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(MODEL, folder)
    return folder


def test_auto_is_the_full_hash_below_the_limit(model_copy):
    auto = modeling.weights_fingerprint(str(model_copy))
    full = modeling.weights_fingerprint(str(model_copy), mode="full")
    assert auto["mode"] == "full" and auto["sha256"] == full["sha256"]
    assert full["sha256"] != modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"]


def test_auto_samples_above_the_limit(model_copy, monkeypatch):
    monkeypatch.setattr(modeling, "FULL_HASH_LIMIT", 1000)
    assert modeling.weights_fingerprint(str(model_copy))["mode"] == "sampled"


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sampled_sees_header_and_sampled_bytes(model_copy):
    weights = model_copy / "model.safetensors"
    before = modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"]
    flip(weights, weights.stat().st_size - 1)  # the last block is always sampled
    after = modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"]
    assert after != before
    flip(weights, 20)  # inside the JSON header (names, dtypes, offsets)
    assert modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"] != after


def test_sampled_reads_a_bounded_amount(model_copy, monkeypatch):
    """64 blocks per file whatever its size: a byte between two sampled blocks goes unseen, which
    is the documented trade-off (the full hash sees it)."""
    monkeypatch.setattr(modeling, "SAMPLES", 2)
    monkeypatch.setattr(modeling, "SAMPLE_BYTES", 16)
    weights = model_copy / "model.safetensors"
    before = modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"]
    full_before = modeling.weights_fingerprint(str(model_copy), mode="full")["sha256"]
    flip(weights, weights.stat().st_size // 2)
    assert modeling.weights_fingerprint(str(model_copy), mode="sampled")["sha256"] == before
    assert modeling.weights_fingerprint(str(model_copy), mode="full")["sha256"] != full_before


def test_unknown_mode_is_a_usage_error(model_copy):
    with pytest.raises(DpocliError, match="--weights-fingerprint"):
        modeling.weights_fingerprint(str(model_copy), mode="quick")
