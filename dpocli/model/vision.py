"""Vision-language rows: reading their images, and tokenizing them exactly as TRL 1.16's
`DataCollatorForVisionPreference` does, with the model's processor.

Rows (JSON Lines or Parquet): `prompt`, `chosen`, `rejected` as TRL's VLM DPO takes them, plus an
`images` column (a list) or an `image` column (one image):
* conversational: lists of {role, content} messages whose content is a string or a list of
  {"type": "text", "text": ...} / {"type": "image"} parts; a prompt whose user turns are plain
  strings gets one image part per image before its first user text (TRL's
  `prepare_multimodal_messages`);
* standard: strings, the prompt holding the processor's image placeholder itself.
An image is a file path (relative to the input file), raw bytes, or the {"bytes", "path"} struct
HF `datasets` writes into Parquet. Each is read to bytes, decoded once to prove it is an image, and
stored in the cache as bytes with its sha256 (so a cache is self-contained and a changed image is
named by row).

Tokenization (TRL's collator, one row at a time, which equals its batch after padding is removed):
the prompt through `processor(images=..., text=[prompt], add_special_tokens=False)` (the image
placeholders expanded to the visual tokens), chosen and rejected through
`processor(text=[...], add_special_tokens=False)`; no EOS is appended (the VLM collator appends
none). prompt+completion is truncated keep_start to max_length; a row whose prompt alone does not
fit is dropped (TRL would cut image tokens and fail).

The image processor is loaded with the PIL backend (`backend="pil"`): the torchvision one cannot
import beside the CPU torch wheel, and the two differ slightly in resampling.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import pyarrow.parquet as pq

from dpocli.data.examples import InputFile, ReadResult
from dpocli.data.tokenization import DROP_PROMPT_TOO_LONG, Dropped
from dpocli.errors import DpocliError
from dpocli.io.atomic import sha256_file
from dpocli.model.load import quiet_transformers

IMAGE_COLUMNS = ("images", "image")


@dataclass(frozen=True)
class VisionExample:
    """One validated vision-language pair; `images` as (bytes, sha256) in placeholder order."""

    id: str
    source_row: int
    prompt: str | list
    chosen: str | list
    rejected: str | list
    images: tuple
    file: str
    row: int


@dataclass(frozen=True)
class VisionPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_shrunk: bool = False


def load_processor(folder, trust_remote_code: bool = False):
    """The model's AutoProcessor with the PIL image processor (see the module notes)."""
    from transformers import AutoProcessor
    quiet_transformers()
    try:
        return AutoProcessor.from_pretrained(folder, backend="pil", trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; all mean "cannot load"
        raise DpocliError(f"has no loadable processor ({type(err).__name__}: {str(err).splitlines()[0]})",
                          file=str(folder), hint="save the processor with the model "
                          "(processor.save_pretrained)") from None


def processor_fingerprint(processor) -> str:
    """sha256 of the processor's settings (image processor and processor config), tokenizer aside."""
    config = processor.to_dict() if hasattr(processor, "to_dict") else {}
    config = {k: v for k, v in config.items() if k not in ("tokenizer", "chat_template")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, loc: dict, field: str):
    """The PIL image of `data` (fully loaded), or one error line naming the row."""
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DpocliError(f"does not decode as an image ({type(err).__name__}: {str(err).splitlines()[0]})",
                          field=field, **loc) from None


def image_bytes(value, base: Path, loc: dict, field: str) -> bytes:
    """One image value (a path relative to the input file, bytes, or {"bytes", "path"}) as bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise DpocliError(f"must be an image path, bytes or a {{bytes, path}} object, got "
                          f"{type(value).__name__}", field=field, **loc)
    path = Path(value) if Path(value).is_absolute() else base / value
    try:
        return path.read_bytes()
    except OSError as err:
        raise DpocliError(f"cannot read image file {path} ({err.strerror or type(err).__name__})",
                          field=field, **loc) from None


def _raw_rows(path: Path):
    """(row number, record) of a JSON Lines or Parquet file."""
    if path.suffix.lower() == ".parquet":
        for i, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, record
        return
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DpocliError(f"line is not valid JSON ({e.msg})", file=str(path), row=i) from None
            if not isinstance(record, dict):
                raise DpocliError("line is JSON but not an object", file=str(path), row=i)
            yield i, record


def has_image_column(source) -> bool:
    """Whether a .jsonl / .parquet input has an `images` or `image` column (TRL looks at the first
    row's keys the same way to choose its vision collator). Anything else: False (the text reader
    then reads it, and refuses image columns itself)."""
    path = Path(source)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".parquet":
        return any(n in IMAGE_COLUMNS for n in pq.read_schema(path).names)
    if path.suffix.lower() != ".jsonl":
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the text reader names the line
                return isinstance(record, dict) and any(n in record for n in IMAGE_COLUMNS)
    return False


def _check_messages(value, loc: dict, field: str) -> None:
    if not isinstance(value, list) or not value:
        raise DpocliError("must be a string or a non-empty list of {role, content} messages",
                          field=field, **loc)
    for m in value:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DpocliError("must be a {role, content} message", field=field, **loc)
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise DpocliError("has a content part that is not {type: text|image}",
                                      field=f"{field}.content", **loc)
        elif not isinstance(content, str):
            raise DpocliError("must be a string or a list of content parts", field=f"{field}.content", **loc)


def read_vision_examples(path, id_column: str | None = None) -> list[VisionExample]:
    """Every row of the file, validated, with its images read and decoded (errors name the row)."""
    path = Path(path)
    if not path.is_file():
        raise DpocliError("vision-language input must be one .jsonl or .parquet file", file=str(path))
    examples = []
    for row, record in _raw_rows(path):
        loc = {"file": str(path), "row": row}
        for name in ("prompt", "chosen", "rejected"):
            if name not in record:
                raise DpocliError("is missing", field=name, **loc)
            if not isinstance(record[name], str):
                _check_messages(record[name], loc, name)
        values = record.get("images")
        if values is None:
            values = [record["image"]] if record.get("image") is not None else []
        if not isinstance(values, list):
            raise DpocliError("must be a list of images", field="images", **loc)
        images = []
        for k, value in enumerate(values):
            data = image_bytes(value, path.parent, loc, f"images[{k}]")
            decode(data, loc, f"images[{k}]")
            images.append((data, sha256_bytes(data)))
        ident = str(record[id_column]) if id_column and record.get(id_column) is not None else (
            str(record["id"]) if record.get("id") is not None else
            hashlib.sha256(json.dumps([record[k] for k in ("prompt", "chosen", "rejected")]).encode()
                           + b"".join(h.encode() for _, h in images)).hexdigest()[:16])
        examples.append(VisionExample(ident, row - 1, record["prompt"], record["chosen"], record["rejected"],
                                      tuple(images), str(path), row))
    if not examples:
        raise DpocliError("holds no rows", file=str(path))
    return examples


def multimodal_messages(messages: list, n_images: int, loc: dict, field: str) -> list:
    """TRL's `prepare_multimodal_messages`: string content as text parts, image parts inserted
    before the first user text when no message has any; the image part count must equal the images."""
    out, included = [], False
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if m["role"] == "user" and not included:
                parts = [{"type": "image"} for _ in range(n_images)] + parts
                included = True
            m = {**m, "content": parts}
        out.append(m)
    count = sum(1 for m in out if m["role"] != "tool" for p in m["content"] if p["type"] == "image")
    if count != n_images:
        raise DpocliError(f"has {count} image part(s) but the row brings {n_images} image(s)",
                          field=field, **loc)
    return out


def render(example: VisionExample, processor) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text as TRL's `apply_chat_template` renders a preference row."""
    if isinstance(example.prompt, str):
        return example.prompt, example.chosen, example.rejected
    loc = {"file": example.file, "row": example.row}
    prompt = multimodal_messages(example.prompt, len(example.images), loc, "prompt")
    chosen = multimodal_messages(example.chosen, 0, loc, "chosen")
    rejected = multimodal_messages(example.rejected, 0, loc, "rejected")
    last = prompt[-1]["role"]
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                         continue_final_message=last == "assistant")
    with_chosen = processor.apply_chat_template(prompt + chosen, tokenize=False)
    with_rejected = processor.apply_chat_template(prompt + rejected, tokenize=False)
    for full in (with_chosen, with_rejected):
        text = "".join(x for x, _ in takewhile(lambda x: x[0] == x[1], zip(text, full)))
    return text, with_chosen[len(text):], with_rejected[len(text):]


def pil_images(example: VisionExample) -> list:
    loc = {"file": example.file, "row": example.row}
    return [decode(data, loc, f"images[{k}]") for k, (data, _) in enumerate(example.images)]


def tokenize_vision_pair(example: VisionExample, processor, max_length: int) -> VisionPair | Dropped:
    """Token ids of one row, equal to TRL 1.16's VLM collator's (see the module notes)."""
    prompt, chosen, rejected = render(example, processor)
    images = pil_images(example)
    try:
        prompt_ids = processor(images=[images] if images else None, text=[prompt],
                               add_special_tokens=False)["input_ids"][0]
    except ValueError as err:  # e.g. placeholder count and image count disagree (standard rows)
        raise DpocliError(f"does not fit its images ({str(err).splitlines()[0]})", field="prompt",
                          file=example.file, row=example.row) from None
    chosen_ids = processor(text=[chosen], add_special_tokens=False)["input_ids"][0]
    rejected_ids = processor(text=[rejected], add_special_tokens=False)["input_ids"][0]
    prompt_ids, chosen_ids, rejected_ids = (list(map(int, x)) for x in (prompt_ids, chosen_ids, rejected_ids))
    if len(prompt_ids) >= max_length:
        return Dropped(DROP_PROMPT_TOO_LONG)
    room = max_length - len(prompt_ids)
    return VisionPair(prompt_ids, chosen_ids[:room], rejected_ids[:room])


def pixel_inputs(processor, images_per_row: list[list]) -> dict:
    """The image processor's tensors for a batch of 2B sequences (chosen rows, then rejected rows:
    each pair's images twice, as TRL's collator passes them); {} when no row has an image."""
    if not any(images_per_row):
        return {}
    out = processor.image_processor(images=images_per_row + images_per_row, return_tensors="pt")
    return dict(out)


def refuse_layouts(prefix_sharing: bool, packing: bool, what: str = "a vision-language cache") -> None:
    """One line for the layouts that cannot carry images (see the module notes)."""
    for flag, on in (("--packing", packing), ("--prefix-sharing", prefix_sharing)):
        if on:
            raise DpocliError(f"is not supported with {what}: image features are placed by each "
                              "sequence's image tokens, which a packed or shared-prompt row would merge",
                              field=flag, hint=f"drop {flag}")


def read_vision_input(cfg, source, model_dir) -> tuple[ReadResult, object]:
    """precompute-ref with a vision-language reference: (the rows read, the model's processor).
    Refuses (one line) what the vision path does not do."""
    refuse_layouts(cfg.prefix_sharing, cfg.packing, "a vision-language model")
    for flag, value, default in (("--prompt-column", cfg.prompt_column, "prompt"),
                                 ("--chosen-column", cfg.chosen_column, "chosen"),
                                 ("--rejected-column", cfg.rejected_column, "rejected"),
                                 ("--drop-identical", cfg.drop_identical, False),
                                 ("--fsdp", cfg.fsdp, False)):
        if value != default:
            raise DpocliError("is not supported with a vision-language model yet", field=flag,
                              hint=f"drop {flag}")
    processor = load_processor(model_dir, trust_remote_code=cfg.trust_remote_code)
    examples = read_vision_examples(source, cfg.id_column)
    path = Path(source)
    files = [InputFile(str(path), path.stat().st_size, sha256_file(path), len(examples))]
    read = ReadResult(examples=examples, files=files, rows_read=len(examples), dropped={}, warnings=[])
    return read, processor


def vision_spec(processor) -> dict:
    """The manifest's `vision` entry: what rebuilds the pixel values."""
    return {"processor_class": type(processor).__name__,
            "image_processor_class": type(processor.image_processor).__name__,
            "processor_fingerprint": processor_fingerprint(processor),
            "images": "stored in the shards (column images, with image_sha256)"}
