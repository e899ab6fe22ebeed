"""Accuracy of a (wrapped) LLaVA or Qwen2-VL on visual-QA records: exact match of the greedy answer, per family,
with the share of each question's relevant patches that survive pruning.

Records are the JSONL format of :mod:`vtoken.vqa.data` (``image``/``pil``, ``question``,
``answer``, optional ``family`` and ``boxes``). The model directory holds the model, its tokenizer
and its image processor, as ``eval/train_tiny_llava.py`` saves them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import vtoken
from vtoken.vqa.data import load_image, relevant_patches
from vtoken.vqa.tokenizer import IMAGE, prompt


def on_model_device(inputs: dict, model: torch.nn.Module) -> dict:
    """``inputs`` moved to the device of ``model``'s parameters (the benchmark builds them on the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@dataclass
class VQAModel:
    """A LLaVA with what it needs to turn records into inputs and outputs into answers."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    image_tokens: int

    @classmethod
    def load(cls, path: str, **options) -> "VQAModel":
        """The model at ``path`` with its tokenizer and image processor; ``options`` go to
        ``from_pretrained`` (``dtype``, ``attn_implementation``)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

        if cls is VQAModel:
            model_type = AutoConfig.from_pretrained(path).model_type
            from vtoken.accounting_vit import HF_MODEL_TYPES as VISION_ONLY

            if model_type in VISION_ONLY:
                raise ValueError(
                    f"{path} is a vision-only {model_type} model: the benchmark asks a vision-language model questions "
                    "about images; time a vision-only model with vtoken.flops and your own evaluation (the repository's "
                    "eval/eval_tiny_clip.py does so for the shipped tiny CLIP)"
                )
            if model_type in QwenVQAModel.MODEL_TYPES:
                return QwenVQAModel.load(path, **options)
            if model_type != "llava":
                return ChatVQAModel.load(path, **options)
        model = LlavaForConditionalGeneration.from_pretrained(path, **options).eval()
        try:  # a saved LlavaProcessor holds both
            processor = AutoProcessor.from_pretrained(path)
            tokenizer, image_processor = processor.tokenizer, processor.image_processor
        except (OSError, ValueError, AttributeError):
            tokenizer, image_processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
        tokenizer.padding_side = "left"
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        if model.config.vision_feature_select_strategy == "full":
            tokens += 1
        return cls(model, tokenizer, image_processor, tokens)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(image size, patch size, patches per side) of the vision tower."""
        vision = self.model.config.vision_config
        return vision.image_size, vision.patch_size, vision.image_size // vision.patch_size

    def encode(self, records: list[dict]) -> dict:
        texts = [prompt(r["question"]).replace(IMAGE, IMAGE * self.image_tokens) for r in records]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        images = [r["pil"] if "pil" in r else load_image(r) for r in records]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "pixel_values": pixels}

    def answer(self, inputs: dict, max_new_tokens: int = 2) -> list[str]:
        inputs = on_model_device(inputs, self.model)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [(t.split() or [""])[0].lower() for t in texts]

    @property
    def has_recall(self) -> bool:
        """Whether :meth:`relevant` maps a record's boxes to this model's visual tokens."""
        return True

    def relevant(self, record: dict) -> list[int]:
        """Image-local visual-token indices of the record's boxes (patch indices, row-major)."""
        image_size, patch_size, _ = self.grid
        offset = int(self.model.config.vision_feature_select_strategy == "full")
        return [offset + p for p in relevant_patches(record, image_size, patch_size)]


@dataclass
class ChatVQAModel(VQAModel):
    """Any family vtoken supports, saved with a processor that carries a chat template (LLaVA-NeXT,
    LLaVA-OneVision, Qwen3-VL, or a LLaVA-1.5 with a template): prompts from the template, inputs from
    the processor. Benchmark images are generated at the image processor's size on a 12 x 12 grid of
    cells. No relevant-patch recall: these families' visual tokens (AnyRes crops, unpadding, dynamic
    grids) do not map one to one onto the generated image's cells, so ``relevant`` is empty and the
    oracle, which reads it, does not run on them."""

    processor: object = None
    image_side: int = 336

    @classmethod
    def load(cls, path: str, **options) -> "ChatVQAModel":
        from transformers import AutoModelForImageTextToText

        processor = _chat_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, **options).eval()
        processor.tokenizer.padding_side = "left"
        return cls(model, processor.tokenizer, processor.image_processor, 0, processor,
                   _image_side(processor.image_processor))

    @property
    def grid(self) -> tuple[int, int, int]:
        """(generated image size, cell size, cells per side): 12 cells per side at any resolution."""
        return self.image_side, self.image_side // 12, 12

    @property
    def has_recall(self) -> bool:
        return False

    def encode(self, records: list[dict]) -> dict:
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
                    for r in records]
        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        images = [r["pil"] if "pil" in r else load_image(r) for r in records]
        return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))

    def relevant(self, record: dict) -> list[int]:
        return []


def _chat_processor(path: str):
    """The processor saved at ``path``, refused in one line (before the model loads) when it has no
    chat template to put the benchmark's questions with."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{path}: the processor has no chat template, so benchmark questions cannot be "
                         "put to the model; save one with the processor (processor.chat_template = ...)")
    return processor


def _image_side(image_processor) -> int:
    """The square size images are resized or cropped to (a multiple of 12, for the generator's grid)."""
    for key in ("crop_size", "size"):
        size = getattr(image_processor, key, None) or {}
        side = size.get("height") or size.get("shortest_edge")
        if side:
            return max(12, int(side) // 12 * 12)
    return 336


@dataclass
class QwenVQAModel(ChatVQAModel):
    """A Qwen2-VL / Qwen2.5-VL with its saved processor (``eval/train_tiny_qwen.py``): prompts from the
    processor's chat template, inputs (``image_grid_thw``, ``mm_token_type_ids``) from the processor.
    The images have one fixed size (the image processor's ``max_pixels``), so every image has the same
    grid; LLM token ``j`` is merged cell ``j`` (row-major) of ``patch_size * merge_size`` pixels."""

    MODEL_TYPES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

    @classmethod
    def load(cls, path: str, **options) -> "QwenVQAModel":
        import transformers
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
        processor = _chat_processor(path)
        model = getattr(transformers, cls.MODEL_TYPES[model_type]).from_pretrained(path, **options).eval()
        processor.tokenizer.padding_side = "left"
        image_size, cell, side = cls._grid(processor.image_processor)
        return cls(model, processor.tokenizer, processor.image_processor, side * side, processor, image_size)

    @staticmethod
    def _grid(image_processor) -> tuple[int, int, int]:
        size = getattr(image_processor, "size", None) or {}
        pixels = size.get("longest_edge") or image_processor.max_pixels
        image_size = int(round(pixels ** 0.5))
        cell = image_processor.patch_size * image_processor.merge_size
        return image_size, cell, image_size // cell

    @property
    def grid(self) -> tuple[int, int, int]:
        """(image size, pixels per LLM token side, LLM tokens per side)."""
        return self._grid(self.image_processor)

    @property
    def has_recall(self) -> bool:
        return True

    def encode(self, records: list[dict]) -> dict:
        """As the chat families, with every image resized to the one square size the grid assumes: an
        image of another size or shape would get another grid from the processor (its tokens no
        longer the cells ``relevant`` maps boxes onto, nor the count the FLOPs are given), while
        ``relevant`` scales a record's boxes from its own ``image_size``."""
        side = self.grid[0]
        resized = []
        for record in records:
            image = record["pil"] if "pil" in record else load_image(record)
            resized.append({**record, "pil": image if image.size == (side, side) else image.resize((side, side))})
        return super().encode(resized)

    def relevant(self, record: dict) -> list[int]:
        """Image-local LLM-token indices (merged cells, row-major) of the record's boxes."""
        image_size, cell, _ = self.grid
        return relevant_patches(record, image_size, cell)


@dataclass
class EvalResult:
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recall_hits: int = 0
    recall_total: int = 0
    kept: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def family_accuracy(self) -> dict[str, float]:
        return {f: self.correct[f] / self.total[f] for f in sorted(self.total)}

    @property
    def recall(self) -> float | None:
        return self.recall_hits / self.recall_total if self.recall_total else None


def annotations_for(vqa, records, relevant=None):
    """A block handing the calls inside it the relevant patches of ``records`` (what the oracle reads;
    ``relevant`` when already computed); nothing when the model is not wrapped."""
    if not vtoken.is_wrapped(vqa.model):
        return contextlib.nullcontext()
    return vtoken.annotate(vqa.model, relevant=relevant if relevant is not None else [vqa.relevant(r) for r in records])


def evaluate(vqa: VQAModel, records: list[dict], batch_size: int = 32) -> EvalResult:
    """Exact-match accuracy of ``vqa.model`` as it is (wrapped or not) on ``records``.

    When the model is wrapped, also the relevant-patch recall: the share of the records' relevant
    patches among the visual tokens that survived every stage. For merging methods (``pool``) a kept
    token stands for a window, so recall there counts only the windows' anchors; treat it as a floor.
    Each batch is evaluated inside ``vtoken.annotate(model, relevant=...)`` (its relevant patches), which
    the oracle reads.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    result = EvalResult()
    wrapped = vtoken.is_wrapped(vqa.model)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        relevant = [vqa.relevant(r) for r in chunk]
        with annotations_for(vqa, chunk, relevant):
            answers = vqa.answer(vqa.encode(chunk))
        for record, answer in zip(chunk, answers):
            family = record.get("family", "all")
            result.total[family] += 1
            result.correct[family] += int(answer == record["answer"].lower())
        if wrapped:
            for per_sample, wanted in zip(vtoken.selection(vqa.model), relevant):
                final = list(per_sample.values())[-1] if per_sample else torch.empty(0)
                result.kept.append(len(final))
                if wanted:
                    result.recall_total += len(wanted)
                    result.recall_hits += len(set(wanted) & set(final.tolist()))
    return result
