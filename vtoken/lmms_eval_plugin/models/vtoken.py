"""The lmms-eval model ``vtoken``: a Hugging Face VLM loaded as it is, wrapped by ``vtoken.wrap``.

    lmms-eval --model vtoken --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=0.25 \\
        --tasks gqa,mme,pope,textvqa_val --batch_size 8 --output_path results/

Loading: ``AutoConfig`` names the family and ``AutoModelForImageTextToText`` picks its class
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL; ``vtoken.wrap`` refuses
anything else, naming why), ``AutoProcessor`` the matching processor, with left padding so batched
prompts end where generation starts (vtoken prunes padded batches per sample).

Parallelism follows lmms-eval's Hugging Face models: under ``accelerate launch`` every process loads
the whole model on its own device (``accelerator.device``: ``cuda:<local rank>``; on a machine
without GPUs ``--multi_gpu`` starts CPU processes joined by a gloo group) and lmms-eval gives each rank
its share of the requests (data parallel; the model is not wrapped in DDP, inference needs no
gradient sync). One process with ``device_map=auto`` splits a model
too large for one GPU across the visible GPUs instead.

``generate_until`` batches requests with equal generation settings (``--batch_size``), longest prompt
first. ``loglikelihood`` (multiple-choice tasks) scores the continuation's tokens from the logits of
one forward pass: pruning inside the LLM shortens the sequence, but every text token is kept, so the
last positions are the continuation's (the pruning then sees the continuation too, as any
single-pass scorer does). What the wrapped schedule costs is added to the results (``stats``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

import vtoken
from vtoken.lmms_eval_plugin import options as _options
from vtoken.lmms_eval_plugin import prompts, stats


def _process_group(accelerator) -> tuple[int, int]:
    """(rank, world size). ``accelerate launch --multi_gpu`` on a machine without GPUs starts several
    processes and a gloo process group, yet its ``Accelerator`` reports one process; lmms-eval's
    evaluator then reads the ranks from torch.distributed, and so does the plug-in."""
    if accelerator.num_processes == 1 and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return accelerator.process_index, accelerator.num_processes


class VTokenLMM(lmms):
    """lmms-eval's ``vtoken`` model: any other ``--model_args`` key is an option of ``method``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        config: str | None = None,
        revision: str = "main",
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        chat_template: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int = 1024,
        use_cache: bool = True,
        **method_options: Any,
    ) -> None:
        super().__init__()
        self.args = _options.parse(pretrained, method, config, method_options)  # fails before any loading
        self.batch_size_per_gpu = _options.batch_size_of(batch_size)
        dtype = _options.dtype_of(dtype)
        self.max_new_tokens = _options.whole_number("max_new_tokens", max_new_tokens)
        self.use_cache = _options.switch("use_cache", use_cache)
        accelerator = Accelerator()
        self.accelerator = accelerator
        self._rank, self._world_size = _process_group(accelerator)
        if self._world_size > 1 and device_map:
            raise _options.ModelArgsError(
                "vtoken: device_map= splits one model across GPUs in one process; with accelerate launch "
                "every process holds a whole model: drop device_map= or run a single process")
        if accelerator.num_processes > 1:
            self._device = accelerator.device
        elif self._world_size > 1:  # a process group accelerate did not adopt (several CPU processes)
            self._device = torch.device("cpu")
        elif not device_map:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model, self.processor = self._load(revision, dtype, device_map, attn_implementation,
                                                 bool(trust_remote_code), min_pixels, max_pixels)
        if device_map:
            self._device = self._model.device  # inputs go where the first layers are
        self.template = prompts.template_for(self.processor, chat_template)
        self.tally = stats.Tally()
        self._wrap()
        if self._rank == 0:
            eval_logger.info(f"vtoken: {self.args.pretrained} ({type(self._model).__name__}) with "
                             f"{self.args.describe()}, {self._world_size} process(es), batch {self.batch_size_per_gpu}")

    # ------------------------------------------------------------------ loading

    def _load(self, revision, dtype, device_map, attn_implementation, trust_remote_code, min_pixels, max_pixels):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from vtoken.bench_args import check_model, check_model_download

        # A missing directory or a hub id the hub cannot serve, in one line: transformers would print
        # five retries over about 20 s, then a traceback.
        try:
            check_model(self.args.pretrained, flag="vtoken --model_args: pretrained=")
            check_model_download(self.args.pretrained, flag="vtoken --model_args: pretrained=")
        except ValueError as err:
            raise _options.ModelArgsError(str(err)) from None
        common = {"revision": revision, "trust_remote_code": trust_remote_code}
        model_type = AutoConfig.from_pretrained(self.args.pretrained, **common).model_type
        kwargs = dict(common, dtype=dtype)
        if device_map:
            kwargs["device_map"] = device_map
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.args.pretrained, **kwargs)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            raise _options.ModelArgsError(
                f"vtoken: {self.args.pretrained} is a {model_type!r} model, not an image-text-to-text one; "
                "use a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint") from None
        model.eval()
        if not device_map:
            model.to(self._device)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        processor = AutoProcessor.from_pretrained(self.args.pretrained, **common, **pixels)
        processor.tokenizer.padding_side = "left"
        return model, processor

    def _wrap(self) -> None:
        try:
            if self.args.config is not None:
                vtoken.wrap(self._model, config=self.args.config)
            elif self.args.method is not None:
                vtoken.wrap(self._model, self.args.method, **self.args.options)
        except ValueError as err:  # e.g. a family that cannot serve the method, a budget above the tokens
            raise _options.ModelArgsError(f"vtoken --model_args: {err}") from None

    # ------------------------------------------------------------------ what lmms-eval reads

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------------ requests

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not hasattr(v, "convert"):
                raise NotImplementedError(f"vtoken: task {task!r} gives a {type(v).__name__} visual; this plug-in "
                                          "evaluates image tasks only (PIL images), not video or audio")
        return [v.convert("RGB") for v in visuals]

    def _encode(self, texts: list[str], visuals: list[list]) -> dict:
        flat = [image for images in visuals for image in images]
        inputs = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        return inputs.to(self._device, self._model.dtype) if hasattr(inputs, "to") else inputs

    @staticmethod
    def _counted(request: Instance) -> bool:
        """lmms-eval pads a rank's requests with copies so every rank runs as many; do not count those."""
        return not (request.metadata or {}).get("__padding_only__", False)

    def _batches(self, requests: list[Instance]):
        """Indices of requests with equal task and generation settings, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups.setdefault(repr((task, split, sorted((gen_kwargs or {}).items(), key=str))), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size_per_gpu):
                yield indices[start : start + self.batch_size_per_gpu]

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen.get("temperature") or 0)
        sample = temperature > 0
        asked = gen.get("max_new_tokens")  # (a task's None: the plug-in's own default, as for temperature)
        kwargs = {"max_new_tokens": self.max_new_tokens if asked is None else int(asked), "do_sample": sample,
                  "num_beams": int(gen.get("num_beams") or 1), "use_cache": self.use_cache,
                  "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                  else self.tokenizer.eos_token_id}
        if sample:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        return kwargs, until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="vtoken responding")
        for batch in self._batches(requests):
            args = [requests[i].args for i in batch]
            visuals = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
            texts = [prompts.render(self.processor, self.template, a[0], len(v)) for a, v in zip(args, visuals)]
            kwargs, until = self._generation_kwargs(args[0][1])
            inputs = self._encode(texts, visuals)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self._model.generate(**inputs, **kwargs)
            self.tally.elapsed += time.perf_counter() - start
            new = out[:, inputs["input_ids"].shape[1] :]
            self.tally.generated += int((new != kwargs["pad_token_id"]).sum())
            self.tally.record(self._model, inputs, visuals, [self._counted(requests[i]) for i in batch])
            for i, a, text in zip(batch, args, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = prompts.cut_at_stops(text, until)
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), answers[i])
            bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, disable=self._rank != 0, desc="vtoken scoring"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = dict(self._encode([prompts.render(self.processor, self.template, context, len(visuals))], [visuals]))
            ids = inputs["input_ids"]
            tail = torch.tensor([self.tokenizer(continuation, add_special_tokens=False)["input_ids"]], device=ids.device)
            if tail.shape[1] == 0:
                results.append((0.0, True))
                continue
            for key, value in list(inputs.items()):  # extend every per-token tensor by the continuation
                if torch.is_tensor(value) and value.shape == ids.shape and key != "input_ids":
                    fill = torch.ones_like(tail) if key == "attention_mask" else torch.zeros_like(tail)
                    inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
            inputs["input_ids"] = torch.cat([ids, tail], dim=1)
            with torch.inference_mode():
                logits = self._model(**inputs).logits[0, -tail.shape[1] - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(1, tail[0].unsqueeze(1)).sum()
            results.append((float(picked), bool((logprobs.argmax(-1) == tail[0]).all())))
            self.tally.record(self._model, inputs, [visuals], [self._counted(request)])
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtoken: multi-round generation is not implemented; use single-turn tasks")

    # ------------------------------------------------------------------ reporting

    def report(self) -> dict[str, float]:
        """Gather every rank's per-request numbers and log them into lmms-eval's results (rank 0).

        Every rank must call this: lmms-eval calls ``clean()`` on every rank after the last request,
        which is where the plug-in calls it."""
        mine = self.tally.take()
        rank, world = _process_group(self.accelerator)
        parts = [mine]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, mine)
        if rank != 0:
            return {}
        rows = [row for part in parts for row in part["rows"]]
        numbers = stats.summary(rows)
        failure = next((p["failure"] for p in parts if p["failure"]), None)
        if failure:
            eval_logger.warning(f"vtoken: FLOPs not counted for some requests ({failure})")
        if numbers:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            elapsed = sum(p["elapsed"] for p in parts)
            generated = sum(p["generated"] for p in parts)
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated,
                        avg_speed=generated / elapsed if elapsed > 0 else 0.0,
                        additional_metrics={"num_requests": len(rows), **numbers})
            eval_logger.info(f"vtoken: {self.args.describe()}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
        return numbers

    def clean(self):
        self.report()
        super().clean()
