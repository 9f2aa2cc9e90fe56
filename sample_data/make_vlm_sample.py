"""Build dpocli's offline vision-language sample: a tiny random-weight LLaVA, its processor, a
few tiny PNG images and preference pairs that use them.

Writes, next to this file:
  tiny-llava/        LlavaForConditionalGeneration (CLIP tower + 2-layer Llama, random weights)
                     + LlavaProcessor (the PIL image processor, no torchvision) whose tokenizer is
                     tiny-llama's BPE plus an `<image>` token, and a chat template with image parts
  tiny-idefics3/     Idefics3ForConditionalGeneration (SmolVLM's family; image splitting into tiles)
                     + Idefics3Processor (PIL image processor), same tokenizer plus Idefics3's tokens
  vlm_images/        six 28x28 .. 56x56 PNGs (one to four visual tokens each after the 2x2 merge)
  vlm_train.jsonl    conversational rows with {"type": "image"} parts and an `images` column of
                     file paths relative to the jsonl

Deterministic (fixed seeds, no network). `build_model(folder, family)` is also what the tests use
to build their own tiny VLMs (tests/test_vision.py).

Usage: python sample_data/make_vlm_sample.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE_TOKENIZER = HERE / "tiny-llama"
IMAGE_TOKEN = "<image>"
# A LLaVA-style template over tiny-llama's roles: string or list content, `<image>` per image part.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Why LLaVA and not Qwen2-VL: transformers 5.25's Qwen2VLProcessor checks its video processor's
# class through VIDEO_PROCESSOR_MAPPING, which does not exist without torchvision, so the
# processor cannot even be constructed beside the CPU torch 2.13 wheel (no torchvision for it).


def _tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BASE_TOKENIZER)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(folder: Path, family: str = "llava", seed: int = 0, image_size: int = 28) -> Path:
    """A tiny random-weight VLM of `family` with its processor (PIL image processor), saved in
    `folder`. LLaVA: CLIP vision tower (patch 14, so (image_size/14)^2 visual tokens per image),
    2-layer projector, 2-layer Llama."""
    if family == "idefics3":
        return _build_idefics3(folder, seed, image_size)
    if family != "llava":
        raise ValueError(f"unknown family {family!r}")
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    tok = _tokenizer()
    config = LlavaConfig(
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": 14, "projection_dim": 32},
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>",
                   *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def _build_idefics3(folder: Path, seed: int, image_size: int) -> Path:
    """Idefics3 (SmolVLM's family): a SigLIP-style tower, pixel-shuffle connector (scale 2, so one
    token per 28x28 tile), 2-layer Llama; the image processor splits an image larger than 28 px
    into 28 px tiles plus a global view (`<row_i_col_j>` / `<global-img>` markers)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    tok = _tokenizer()
    tok.add_tokens(IDEFICS3_TOKENS, special_tokens=True)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 14},
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size},
                                                do_image_splitting=True,
                                                max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=(image_size // 14) ** 2 // 4, chat_template=CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "black": (10, 10, 10), "white": (245, 245, 245)}
SIZES = [(28, 28), (56, 28), (28, 56), (56, 56), (28, 28), (42, 42)]


def make_images(folder: Path, seed: int = 0) -> list[str]:
    """One small PNG per colour (with a little noise, so the pixels differ): the file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for (name, rgb), (w, h) in zip(COLOURS.items(), SIZES):
        pixels = np.clip(np.array(rgb)[None, None, :] + rng.integers(-20, 21, (h, w, 3)), 0, 255)
        path = folder / f"{name}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path, optimize=False)
        names.append(path.name)
    return names


def make_rows(image_dir: str, n: int = 12) -> list[dict]:
    """Conversational pairs: 'what colour is this?' with the right colour chosen; some rows have two
    images, one row has none."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        first, second = colours[i % len(colours)], colours[(i + 2) % len(colours)]
        wrong = colours[(i + 1) % len(colours)]
        if i % 5 == 4:
            content = [{"type": "text", "text": "Name a colour."}]
            images, answer = [], first
        elif i % 3 == 2:
            content = [{"type": "image"}, {"type": "image"},
                       {"type": "text", "text": "What colour is the first image?"}]
            images, answer = [f"{image_dir}/{first}.png", f"{image_dir}/{second}.png"], first
        else:
            content = [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]
            images, answer = [f"{image_dir}/{first}.png"], first
        rows.append({"id": f"vlm-{i:03d}", "images": images,
                     "prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": f"It is {answer}."}],
                     "rejected": [{"role": "assistant", "content": f"It is {wrong}, I think."}]})
    return rows


def main() -> int:
    build_model(HERE / "tiny-llava")
    build_model(HERE / "tiny-idefics3", "idefics3")
    make_images(HERE / "vlm_images")
    with open(HERE / "vlm_train.jsonl", "w", encoding="utf-8") as fh:
        for row in make_rows("vlm_images"):
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {HERE / 'tiny-llava'}, {HERE / 'tiny-idefics3'}, {HERE / 'vlm_images'}, "
          f"{HERE / 'vlm_train.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
