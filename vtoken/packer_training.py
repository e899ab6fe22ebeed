"""Training a TokenPacker projector for a LLaVA model: ``vtoken.train_projector`` and ``vtoken train-projector``.

The recipe is TokenPacker's (paper §4.1 and the official ``scripts/v1_5``), at any scale:

- **architecture and start** (default ``init="random"``): the published packer, the official
  ``TokenPacker`` class of CircleRadon/TokenPacker (``llava/model/multimodal_projector/builder.py``):
  no residual (``residual=False``), every Linear trunc-normal(0.02) with zero biases, LayerNorms 1/0
  (``TokenPackerModule._init_weights``). ``init="projector"`` is vtoken's frugal variant, not the
  published architecture: ``residual=True`` (the interpolated query is added to the injected value),
  the output MLP copied from the model's own projector and the injection zeroed, so training starts
  from "interpolate, then the original projector" (see :func:`build_packer`). The TokenPacker weights
  shipped for the tiny LLaVA (``vtoken/assets/tiny-llava-trained/tokenpacker-s2`` and ``-s3``) were
  trained with ``init="projector"`` (their ``training_args.json`` and ``packer_config.json``:
  ``residual: true``), stage 1 only, 1000 steps of batch 8 on 8000 generated train records, lr 1e-3.
- **stage 1** (alignment): only the packer trains; the vision tower and the LLM are frozen. The loss is
  next-token cross-entropy on the answer (caption) tokens and the ``</s>`` after them, nothing else.
  Paper: lr 1e-3, cosine schedule, warm-up 3%, weight decay 0, 1 epoch.
- **stage 2** (instruction tuning, optional): the LLM (decoder and LM head) trains too; the vision tower
  stays frozen. Paper: lr 2e-5.

The prompt is not the official stage-1 template. Official stage 1 (``scripts/v1_5/pretrain.sh``:
``--version plain``; ``llava/train/train.py``, ``preprocess_plain``) trains on captions (LLaVA-Pretrain
558K): the human turn is replaced by the image alone, the text is ``<image>`` + caption + ``"\\n"`` (no
system prompt, no question), and the loss covers the caption and the ``"\\n"``. Here both stages use the
records' question prompt (``vtoken.vqa.tokenizer.prompt``), the answer and ``</s>`` (stage 2's style),
because the data this trains on are questions about the image, which the plain template would drop.

The packer runs exactly as it does at inference: the model is wrapped with ``vtoken.wrap(model,
"tokenpacker", weights=<the packer being trained>)``, so the LLM sees the packed tokens at the positions
inference gives them, and the gradient reaches the packer through vtoken's projector-site hook. The
wrap is removed at the end (the model's stage-1 state is then exactly what it was; stage 2 changes the
LLM's weights in place, which is its purpose).

Data: any (image, text) pairs in the benchmark's JSONL format (``vtoken.vqa.data.load_jsonl``: ``image``,
``question``, ``answer``), a list of such records (with ``"pil"`` images or paths), or ``"generated"``
(the offline benchmark's ``train`` split at the model's image size). Text: the benchmark prompt
(``vtoken.vqa.tokenizer.prompt``) with ``<image>`` expanded to the model's visual-token count, followed
by the answer and ``</s>``; batches are left-padded with generate()'s position ids (what inference does).

Machinery: ``accelerate.Accelerator`` for the device, mixed precision (``autocast``) and gradient
accumulation; one process only (the packer runs inside the LLaVA forward through hooks, outside what a
DDP wrapper would synchronise). ``tqdm`` progress; checkpoints ``out/checkpoint-<step>/`` every
``save_every`` steps and at the end (packer + optimizer + scheduler + step, and the LLM weights in stage
2); a rerun with the same ``out`` resumes from the newest checkpoint and gives the same weights as an
uninterrupted run (the data order is a pure function of ``seed`` and the step). A checkpoint records a
fingerprint of the base model's weights; one made on other weights is refused with an error.

Output: ``out/packer_config.json`` + ``out/packer.safetensors`` (``vtoken.wrap(model, "tokenpacker",
weights=out)``), ``out/training_args.json``, ``out/log.jsonl`` (loss per step), and after stage 2
``out/model/`` (the fine-tuned LLaVA with its processor, which the packer belongs with).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time
from typing import Iterable

import torch
import torch.nn.functional as F

from vtoken.packer import PackerConfig, TokenPackerModule, default_layers

STATE_NAME = "trainer_state.pt"
LLM_NAME = "llm.safetensors"


# --------------------------------------------------------------------------------------------- setup
def _load(model, processor):
    """(model, tokenizer, image processor, path-or-None) from a model object or a directory."""
    path = None
    if isinstance(model, (str, os.PathLike)):
        from vtoken.vqa.evaluate import VQAModel

        path = str(model)
        if processor is None:
            vqa = VQAModel.load(path)
            return vqa.model, vqa.tokenizer, vqa.image_processor, path
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path)
    if processor is None:
        raise ValueError(
            "train_projector needs the model's processor to turn records into inputs: pass processor= "
            "(a LlavaProcessor, or a (tokenizer, image_processor) pair), or pass the model as a directory "
            "that holds them"
        )
    if isinstance(processor, (tuple, list)):
        tokenizer, image_processor = processor
    else:
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
    return model, tokenizer, image_processor, path


def _check_model(model) -> None:
    from transformers import LlavaForConditionalGeneration

    if not isinstance(model, LlavaForConditionalGeneration):
        raise ValueError(
            f"train_projector trains TokenPacker for LLaVA-1.5-style models (LlavaForConditionalGeneration); "
            f"got {type(model).__name__} (LLaVA-NeXT's AnyRes grids are not supported)"
        )
    if model.config.vision_feature_select_strategy != "default":
        raise ValueError(
            "TokenPacker packs the patch grid only; this model keeps the CLS token among its visual tokens "
            "(vision_feature_select_strategy='full'). Use a model with vision_feature_select_strategy='default'"
        )


def _feature_layer(model) -> int:
    depth = model.config.vision_config.num_hidden_layers
    chosen = model.config.vision_feature_layer
    chosen = [chosen] if isinstance(chosen, int) else list(chosen)
    return max(j % (depth + 1) for j in chosen)


def build_packer(model, scale: int = 2, layers=None, init: str = "random", residual: bool | None = None,
                 seed: int = 0) -> TokenPackerModule:
    """A packer shaped for ``model`` (widths, grid, depth from its configs).

    ``layers``: hidden-state indices of the multi-level features (default: the official [12, 16, 22, 23]
    of 24 scaled to this tower, :func:`vtoken.packer.default_layers`). ``init``:

    - ``"random"`` (default): the published architecture, as the official ``TokenPacker`` class builds
      it: its initialisation (trunc-normal 0.02, zero biases) and, unless ``residual`` says otherwise,
      no residual.
    - ``"projector"``: vtoken's variant (not the published architecture): ``residual=True``, the output
      MLP copied from the model's projector and the injection zeroed, so training starts from
      "interpolate, then the original projector" (the 2x2-mean baseline at s=2) and learns the
      injection; a frugal start for small data. The packers shipped for the tiny LLaVA were trained so.
    - a directory: a packer saved before (e.g. stage 1's output, to start stage 2).
    """
    _check_model(model)
    if isinstance(init, (str, os.PathLike)) and init not in ("projector", "random"):
        packer = TokenPackerModule.from_pretrained(init)
        if packer.config.scale != scale:
            raise ValueError(f"the packer in {init} has scale {packer.config.scale}, not {scale}")
        return packer
    if init not in ("projector", "random"):
        raise ValueError(f"init must be 'projector', 'random' or a packer directory, got {init!r}")
    config = model.config
    vision = config.vision_config
    projector = model.model.multi_modal_projector
    depth = vision.num_hidden_layers
    layers = list(layers) if layers is not None else default_layers(_feature_layer(model))
    if max(layers) > depth:
        raise ValueError(f"layers {layers} go past the {depth}-layer vision tower (hidden states 1..{depth})")
    residual = (init == "projector") if residual is None else residual
    side = vision.image_size // vision.patch_size
    packer_config = PackerConfig(
        query_dim=projector.linear_1.in_features, level_dim=vision.hidden_size,
        llm_hidden=config.text_config.hidden_size, layers=layers, scale=scale,
        act=config.projector_hidden_act, mlp_bias=getattr(config, "multimodal_projector_bias", True),
        residual=residual, grid=[side, side], vision_layers=depth,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        packer = TokenPackerModule(packer_config)
    if init == "projector":
        packer.copy_output_mlp(projector.linear_1, projector.linear_2)
        if residual:
            packer.zero_injection()
    return packer


def _records(data, image_size: int, patch_size: int, generated: int, seed: int) -> list[dict]:
    from vtoken.vqa.data import generate, load_jsonl

    if isinstance(data, str) and data == "generated":
        return generate("train", generated, seed=seed, image_size=image_size, patch_size=patch_size)
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data)
    records = list(data)
    for i, record in enumerate(records):
        missing = {"question", "answer"} - record.keys()
        if missing or ("image" not in record and "pil" not in record):
            raise ValueError(f"record {i} needs 'image' (or 'pil'), 'question' and 'answer'; missing {sorted(missing)}")
    return records


class Encoder:
    """Records -> model inputs: the benchmark prompt with the image expanded, then the answer and
    ``</s>``; left padding and generate()'s position ids. ``labels`` hold the answer tokens (and ``</s>``)
    and -100 elsewhere."""

    def __init__(self, tokenizer, image_processor, image_tokens: int, image_token_id: int):
        from vtoken.vqa.tokenizer import IMAGE

        self.tokenizer, self.image_processor, self.image_tokens = tokenizer, image_processor, image_tokens
        found = tokenizer.convert_tokens_to_ids(IMAGE)
        if found != image_token_id:
            raise ValueError(
                f"the tokenizer maps {IMAGE!r} to {found} but the model's image_token_id is {image_token_id}; "
                "pass the model's own processor"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token to end the answers with")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, records: list[dict]) -> dict:
        from vtoken.vqa.data import load_image
        from vtoken.vqa.tokenizer import IMAGE, prompt

        rows, labels = [], []
        for record in records:
            text = prompt(record["question"]).replace(IMAGE, IMAGE * self.image_tokens)
            ids = self.tokenizer(text)["input_ids"]
            answer = self.tokenizer(" " + str(record["answer"]).strip(), add_special_tokens=False)["input_ids"]
            answer = [*answer, self.tokenizer.eos_token_id]
            rows.append([*ids, *answer])
            labels.append([-100] * len(ids) + answer)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            input_ids[i, width - len(row):] = torch.tensor(row)
            label_ids[i, width - len(row):] = torch.tensor(lab)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() builds them
        images = [load_image(r) for r in records]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                "pixel_values": pixels, "labels": label_ids}


def answer_loss(model, batch: dict, image_token_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of ``batch``.

    The wrapped model drops visual tokens, so its logits are shorter than ``input_ids``; vtoken packs each
    sample's kept tokens to the right, so every token after a sample's last image keeps its distance from
    the end. Only the trailing logits that predict answer tokens are computed (``logits_to_keep``) and
    matched with the trailing labels; an answer must follow its sample's image."""
    ids, labels = batch["input_ids"], batch["labels"]
    length = ids.shape[1]
    slots = torch.arange(length, device=ids.device)
    last_image = torch.where(ids == image_token_id, slots, -1).max(dim=-1).values
    labelled = labels != -100
    if not bool(labelled.any(dim=-1).all()):
        raise ValueError("every training sample needs answer tokens")
    first = torch.where(labelled, slots, length).min(dim=-1).values  # first answer token per sample
    if bool((first - 1 <= last_image).any()):
        raise ValueError("the answer must come after the image (and at least one text token)")
    window = length - int(first.min()) + 1  # logits from the token before the earliest answer on
    outputs = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                    pixel_values=batch["pixel_values"], use_cache=False, logits_to_keep=window)
    logits = outputs.logits[:, -window:]
    targets = labels[:, length - window + 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------- training
def _order(count: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Record indices of micro-batch ``micro_step``: epoch ``e`` is a permutation seeded by
    ``(seed, e)``, cut into batches (the last one shorter)."""
    per_epoch = math.ceil(count / batch_size)
    epoch, within = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(count, generator=generator).tolist()
    return perm[within * batch_size:(within + 1) * batch_size]


def _latest_checkpoint(out: str) -> str | None:
    found = []
    for path in glob.glob(os.path.join(out, "checkpoint-*")):
        match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if match and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _llm_parameters(model) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    return {n: p for n, p in named.items() if n.startswith(("model.language_model.", "lm_head."))}


def base_model_fingerprint(model) -> str:
    """Hash of the base model's weights (a strided sample of every tensor): a checkpoint records it
    so that a rerun with the same ``out`` cannot silently resume a packer trained on other weights
    (the same path holding a retrained model, say)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(name.encode() + str(tuple(param.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_checkpoint(path: str, packer, optimizer, scheduler, step: int, llm: dict | None,
                     fingerprint: str) -> None:
    from safetensors.torch import save_file

    packer.save_pretrained(path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "base_model": fingerprint}, os.path.join(path, STATE_NAME))
    if llm is not None:
        save_file({n: p.detach().contiguous().cpu() for n, p in llm.items()}, os.path.join(path, LLM_NAME))


def train_projector(
    model, data, processor=None, out: str | os.PathLike | None = None, scale: int = 2, stage: int = 1,
    steps: int | None = None, epochs: float = 1.0, lr: float | None = None, batch_size: int = 8, seed: int = 0,
    layers: Iterable[int] | None = None, init: str = "random", residual: bool | None = None,
    grad_accum: int = 1, mixed_precision: str = "no", device: str | None = None, save_every: int | None = None,
    resume: bool = True, warmup_ratio: float = 0.03, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
    generated: int = 2000, progress: bool = True, log_every: int = 1,
) -> TokenPackerModule:
    """Train a TokenPacker projector for ``model`` (a ``LlavaForConditionalGeneration`` or its
    directory) and return it (also saved in ``out``: wrap with ``vtoken.wrap(model, "tokenpacker",
    weights=out)``).

    Args:
        data: a JSONL path (``image``, ``question``, ``answer``), a list of records, or ``"generated"``
            (``generated`` records of the offline benchmark's train split at the model's image size).
        processor: the model's ``LlavaProcessor`` or ``(tokenizer, image_processor)``; read from the
            directory when ``model`` is one.
        out: output directory (checkpoints, final packer, logs); required.
        scale: region side s (2, 3, 4: 1/4, 1/9, 1/16 of the tokens).
        stage: 1 trains the packer only; 2 also the LLM (start it from stage 1's packer: ``init=<dir>``).
        steps / epochs: optimizer steps (default: ``epochs`` passes over the data).
        lr: default 1e-3 (stage 1) / 2e-5 (stage 2), the paper's; cosine with ``warmup_ratio`` warm-up.
        batch_size / grad_accum: micro-batch size and micro-batches per optimizer step.
        layers / init / residual: see :func:`build_packer` (default ``init="random"``: the published
            architecture; ``init="projector"``: vtoken's residual variant, the shipped packers' recipe).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate autocast); ``device``: ``"cpu"``
            forces the CPU, default is accelerate's choice (the model is moved there and stays there).
        save_every: checkpoint every N optimizer steps (always at the end); ``resume``: continue from the
            newest ``out/checkpoint-*``.
    """
    from accelerate import Accelerator

    import vtoken

    if out is None:
        raise ValueError("train_projector needs out=<directory> for its checkpoints and the trained packer")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (packer only) or 2 (packer and LLM), got {stage!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps} (None trains `epochs` passes over the data)")
    if not 0 < epochs < math.inf:
        raise ValueError(f"epochs must be a positive number, got {epochs}")
    _check_training_numbers(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
                            log_every=log_every, save_every=save_every, generated=generated, layers=layers)
    out = str(out)
    model, tokenizer, image_processor, path = _load(model, processor)
    _check_model(model)
    if vtoken.is_wrapped(model):
        raise ValueError("the model is wrapped by vtoken; call vtoken.unwrap(model) before training a projector")
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    records = _records(data, vision.image_size, vision.patch_size, generated, seed)
    if not records:
        raise ValueError("no training records")
    encode = Encoder(tokenizer, image_processor, side * side, model.config.image_token_id)
    lr = lr if lr is not None else (1e-3 if stage == 1 else 2e-5)
    per_epoch = math.ceil(len(records) / batch_size)
    total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch / grad_accum))

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision,
                              gradient_accumulation_steps=grad_accum)
    if accelerator.num_processes > 1:
        raise ValueError("train_projector runs in one process (one GPU or the CPU); launch it without DDP")
    os.makedirs(out, exist_ok=True)
    checkpoint = _latest_checkpoint(out) if resume else None
    fingerprint = base_model_fingerprint(model)  # before stage 2 restores a checkpoint's LLM
    resumed_state = torch.load(os.path.join(checkpoint, STATE_NAME), weights_only=False) if checkpoint else None
    if resumed_state is not None:
        recorded = resumed_state.get("base_model")
        if recorded is not None and recorded != fingerprint:
            raise ValueError(
                f"{checkpoint} was trained on a base model with other weights than this one (fingerprint "
                f"{recorded} != {fingerprint}); pass a fresh out directory or resume=False to start over")
    packer = build_packer(model, scale, layers, checkpoint or init, residual, seed)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training

    def restore_model() -> None:  # the caller's flags and mode, whatever stops the training
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
        model.train(was_training)

    try:
        return _train(model, packer, accelerator, records, encode, out, path, data, checkpoint, resumed_state,
                      fingerprint, scale=scale, stage=stage, total=total, lr=lr, batch_size=batch_size,
                      grad_accum=grad_accum, seed=seed, init=init, mixed_precision=mixed_precision,
                      warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                      save_every=save_every, progress=progress, log_every=log_every,
                      saved_parts=(tokenizer, image_processor))
    finally:
        restore_model()


def _check_training_numbers(*, steps, batch_size, grad_accum, lr, weight_decay, warmup_ratio, max_grad_norm,
                            log_every, save_every, generated, layers) -> None:
    """train_projector's counts and rates, each refused in one line before the model is loaded or
    touched (AdamW refused a negative lr only after the model's parameters were frozen; a float batch
    size failed inside the data loader)."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name, value, least in (("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1),
                               ("log_every", log_every, 1), ("generated", generated, 1)):
        if not whole(value) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    if steps is not None and not whole(steps):  # (steps < 1: train_projector's own check, before this one)
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r} (None trains `epochs` passes over the data)")
    if save_every is not None and (not whole(save_every) or save_every < 0):
        raise ValueError(f"save_every must be a whole number >= 0 (0: only at the end), got {save_every!r}")
    for name, value, low, high in (("lr", lr, 0.0, math.inf), ("weight_decay", weight_decay, 0.0, math.inf),
                                   ("warmup_ratio", warmup_ratio, 0.0, 1.0), ("max_grad_norm", max_grad_norm, 0.0, math.inf)):
        if value is None and name == "lr":
            continue
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not real or not low <= value < high or (name == "lr" and value == 0):
            bound = "a positive number" if name == "lr" else f"a number in [{low:g}, {high:g})"
            raise ValueError(f"{name} must be {bound}, got {value!r}")
    if layers is not None and not list(layers):
        raise ValueError("layers=[] names no vision layer; give the vision hidden states to pack, or None for "
                         "the published ones")


def _train(model, packer, accelerator, records, encode, out, path, data, checkpoint, resumed_state, fingerprint, *,
           scale, stage, total, lr, batch_size, grad_accum, seed, init, mixed_precision, warmup_ratio, weight_decay,
           max_grad_norm, save_every, progress, log_every, saved_parts) -> TokenPackerModule:
    """train_projector's loop on a loaded model and a built packer (the caller restores the model's
    flags and mode after it, whatever happens); ``saved_parts``: the tokenizer and image processor,
    saved beside a stage-2 model."""
    from tqdm.auto import tqdm

    import vtoken

    llm = _llm_parameters(model) if stage == 2 else None
    if checkpoint is not None and llm is not None:
        from safetensors.torch import load_file

        state = load_file(os.path.join(checkpoint, LLM_NAME))
        with torch.no_grad():
            for name, param in llm.items():
                param.copy_(state[name])
    model.to(accelerator.device)
    packer.to(accelerator.device)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(packer.parameters())
    if llm is not None:
        for p in llm.values():
            p.requires_grad_(True)
        trainable += list(llm.values())
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    start = 0
    if resumed_state is not None:
        optimizer.load_state_dict(resumed_state["optimizer"])
        scheduler.load_state_dict(resumed_state["scheduler"])
        start = int(resumed_state["step"])
    args = {
        "model": path, "data": data if isinstance(data, (str, os.PathLike)) else f"<{len(records)} records>",
        "records": len(records), "scale": scale, "stage": stage, "steps": total, "lr": lr, "batch_size": batch_size,
        "grad_accum": grad_accum, "seed": seed, "layers": packer.config.layers, "init": str(init),
        "residual": packer.config.residual, "mixed_precision": mixed_precision, "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "resumed_from": checkpoint,
        "started_at_step": start,
    }
    with open(os.path.join(out, "training_args.json"), "w") as f:
        json.dump(args, f, indent=2, default=str)

    model.eval()  # frozen parts in eval mode (no dropout); the trained parts follow
    packer.train()
    if llm is not None:
        model.model.language_model.train()
    vtoken.wrap(model, "tokenpacker", weights=packer)
    log = open(os.path.join(out, "log.jsonl"), "a")
    bar = tqdm(total=total, initial=start, disable=not progress, desc=f"tokenpacker s={scale} stage {stage}")
    step, began = start, time.perf_counter()
    try:
        while step < total:
            losses = []
            for micro in range(grad_accum):
                indices = _order(len(records), batch_size, seed, step * grad_accum + micro)
                batch = {k: v.to(accelerator.device) for k, v in encode([records[i] for i in indices]).items()}
                with accelerator.accumulate(packer):
                    with accelerator.autocast():
                        loss = answer_loss(model, batch, model.config.image_token_id)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                losses.append(float(loss.detach()))
            step += 1
            value = sum(losses) / len(losses)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % log_every == 0 or step == total:
                log.write(json.dumps({"step": step, "loss": value, "lr": scheduler.get_last_lr()[0],
                                      "seconds": round(time.perf_counter() - began, 3)}) + "\n")
                log.flush()
            if (save_every and step % save_every == 0) or step == total:
                _save_checkpoint(os.path.join(out, f"checkpoint-{step}"), packer, optimizer, scheduler, step, llm,
                                 fingerprint)
    finally:
        bar.close()
        log.close()
        vtoken.unwrap(model)
    packer.eval()
    packer.save_pretrained(out)
    if llm is not None:
        model.save_pretrained(os.path.join(out, "model"))
        for part in saved_parts:
            if hasattr(part, "save_pretrained"):
                part.save_pretrained(os.path.join(out, "model"))
    return packer


__all__ = ["train_projector", "build_packer", "answer_loss", "Encoder"]
