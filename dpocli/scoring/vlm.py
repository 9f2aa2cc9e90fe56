"""Vision-language batches: cached token ids plus the pixel values rebuilt from the cached images.

The cache stores each row's images as encoded bytes with their sha256 (cache.IMAGES,
cache.IMAGE_SHA256); every batch decodes them and runs the processor's image processor on the
2B sequences (each pair's images for its chosen row and again for its rejected row, as TRL's
collator does). The image processor is deterministic, so the pixel values of a batch are the same
in precompute, train and eval. Before any use the stored bytes are checked against their sha256,
so an image that changed since precompute is named by row (`cache.verify_images`, run by
`cache.load_cache` for train, eval and `cache verify`).

Layouts: only the padded one (prompt+chosen and prompt+rejected rows, right padding). Packing
and prefix sharing are refused: image features are placed by the positions of the image tokens
of each sequence, which a packed row or a shared-prompt row would merge or drop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dpocli.errors import DpocliError
from dpocli.model import vision
from dpocli.model.batching import Batch


@dataclass(frozen=True)
class VisionBatch:
    """A padded `Batch` plus the image processor's tensors (pixel values, ...) for its rows."""

    batch: Batch
    pixels: dict

    @property
    def num_pairs(self) -> int:
        return self.batch.num_pairs

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> VisionBatch:
        return VisionBatch(self.batch.to(device), {k: v.to(device) if torch.is_tensor(v) else v
                                                   for k, v in self.pixels.items()})

    def model_inputs(self):
        return replace(self.batch.model_inputs(), extra=self.pixels or None)


def attach(data, processor, cache_dir) -> None:
    """Let `scoring.cache_batch` build vision batches of `data`: rows -> the processor's tensors.
    (`cache.load_cache` has checked every image against its sha256.)"""

    def pixels(rows) -> dict:
        per_row = []
        for i in rows:
            loc = {"file": str(cache_dir), "row": int(data.source_row[i]) + 1}
            per_row.append([vision.decode(blob, loc, f"images[{k}]")
                            for k, (blob, _) in enumerate(data.row_images(i))])
        return vision.pixel_inputs(processor, per_row)
    data.pixels = pixels


def cache_processor(cache_dir, manifest):
    """The processor saved in the cache (precompute saves the whole processor in tokenizer/)."""
    return vision.load_processor(Path(cache_dir) / "tokenizer")


def prepare_cache(cache_dir, manifest, data, prefix_sharing: bool = False, packing: bool = False):
    """For train/eval: a vision cache gets its processor attached (layouts checked); a text cache
    is left as it is. Returns the processor, or None for a text cache."""
    if "vision" not in manifest.spec:
        return None
    vision.refuse_layouts(prefix_sharing, packing)
    processor = cache_processor(cache_dir, manifest)
    attach(data, processor, cache_dir)
    return processor


def prepare_train_caches(cfg, manifest, data, eval_set):
    """`dpo train`'s caches (training and --eval-cache) made ready for vision batches; the
    processor, or None for text caches. --fsdp is refused with a vision-language cache."""
    processor = prepare_cache(cfg.cache, manifest, data, cfg.prefix_sharing, cfg.packing)
    if eval_set is not None:
        prepare_cache(cfg.eval_cache, *eval_set)
    if processor is not None and cfg.fsdp:
        raise DpocliError("is not supported with a vision-language cache yet", field="--fsdp")
    return processor


def image_columns(examples) -> dict:
    """The cache columns of a shard's examples: image bytes and their sha256."""
    return {"images": [[blob for blob, _ in ex.images] for ex in examples],
            "image_sha256": [[digest for _, digest in ex.images] for ex in examples]}


def image_stats(examples) -> dict:
    return {"images": sum(len(ex.images) for ex in examples),
            "image_bytes": sum(len(blob) for ex in examples for blob, _ in ex.images)}
