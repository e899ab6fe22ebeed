"""The README's example, runnable as it is: python examples/quickstart.py"""

import torch
import vtoken
from vtoken.bench import builtin_model, synthetic_inputs

model = builtin_model()                      # or LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
inputs = synthetic_inputs(model, batch=2)    # or processor(images=..., text=..., return_tensors="pt")

vtoken.wrap(model, "fastv", keep=1/9)        # FastV: drop visual tokens at LLM layer 2, keep 16 of 144
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(vtoken.selection(model)[0])            # {'llm:2': tensor([...16 indices...])}
vtoken.unwrap(model)                         # the model is exactly the original again

with vtoken.pruned(model, "pool", keep_tokens=16):   # wrap for a block only
    model(**inputs)
    vtoken.show(model, inputs["pixel_values"][0], "kept.png")   # kept patches over the image
