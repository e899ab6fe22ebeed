"""Prompts and answers: one lmms-eval request as the model's own chat format, and back.

Every family vtoken supports ships a processor whose chat template places the image tokens (LLaVA's
``<image>``, Qwen's ``<|vision_start|><|image_pad|><|vision_end|>``), so the plug-in builds the
standard multimodal message (one ``{"type": "image"}`` per image, then the text) and lets the
processor render it; the processor then expands each image placeholder into that image's visual
tokens. Tasks written for LLaVA sometimes put a literal ``<image>`` in their text: it is removed, since
the message already carries the images.

A checkpoint saved without a chat template gets ``PLAIN_TEMPLATE``, LLaVA-1.5's single-turn form
``USER: <image>\\n{text}\\nASSISTANT:`` with the processor's image token (the prompt vtoken's tiny LLaVA
was trained on, ``vtoken.vqa.tokenizer.prompt``, which its shipped template renders too).
``chat_template=FILE`` overrides both.
"""

from __future__ import annotations

import os
import re

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE_TOKEN\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"  # a literal newline after a tag is trimmed (trim_blocks)
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}ASSISTANT:{% endif %}"
)
_LITERAL_IMAGE = re.compile(r"<image>\s*")


def template_for(processor, chat_template: str | None) -> str | None:
    """The chat template to render with: ``chat_template`` (a file path or the template itself), else the
    processor's own (``None``: let the processor use it), else ``PLAIN_TEMPLATE``."""
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                return f.read()
        return chat_template
    if getattr(processor, "chat_template", None):
        return None
    token = getattr(processor, "image_token", None) or "<image>"
    return PLAIN_TEMPLATE.replace("IMAGE_TOKEN", token)


def render(processor, template: str | None, text: str, images: int) -> str:
    """The generation prompt for one user turn with ``images`` images and ``text``."""
    if images and "<image>" in text:
        text = _LITERAL_IMAGE.sub("", text)
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    kwargs = {} if template is None else {"chat_template": template}
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return prompt if isinstance(prompt, str) else prompt[0]


def cut_at_stops(text: str, until: list[str] | None) -> str:
    """The answer up to the first stop string lmms-eval asked for (``until``), as the harness expects.

    Generation itself stops at the model's end-of-sequence token or ``max_new_tokens``; cutting here
    keeps batched generation simple and gives the same text."""
    for stop in until or ():
        if stop:
            text = text.split(stop, 1)[0]
    return text
