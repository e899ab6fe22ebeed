"""The README's example, runnable as it is: python examples/quickstart.py"""

from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtoken
from vtoken.bench import default_model_path
from vtoken.vqa.data import generate

path = default_model_path()                  # the tiny LLaVA shipped with vtoken, or "llava-hf/llava-1.5-7b-hf"
model = LlavaForConditionalGeneration.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
record = generate("test", 1, seed=3, image_size=96, patch_size=8)[0]   # a benchmark image and its question
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(images=record["pil"], text=prompt, return_tensors="pt")

vtoken.wrap(model, "fastv", keep=1/9)        # FastV: drop visual tokens at LLM layer 2, keep 16 of 144
out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(record["question"], "->", answer.strip(), f"(truth: {record['answer']})")
print(vtoken.selection(model)[0])            # {'llm:2': tensor([...16 indices...])}
vtoken.unwrap(model)                         # the model is exactly the original again

with vtoken.pruned(model, "pool", keep_tokens=16):   # wrap for a block only
    model(**inputs)
    vtoken.show(model, record["pil"], "kept.png")    # what each kept token stands for, over the image
