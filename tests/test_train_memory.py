"""`dpo train` returns freed activations to the system between steps (issue 25): it fixes glibc's
mmap threshold in every process, not only under torchrun (`distributed.fix_mmap_threshold`; the
measured effect on peak RSS is in bench/RESULTS.md, "Where the peak goes")."""

from __future__ import annotations

from conftest import MODEL, invoke
from dpocli.model import distributed


def test_train_fixes_the_mmap_threshold_once(small_cache, tmp_path, monkeypatch):
    calls = []
    real = distributed.fix_mmap_threshold

    def record():
        calls.append(1)
        real()
    monkeypatch.setattr(distributed, "fix_mmap_threshold", record)
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--max-steps", 1,
                     "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 1
