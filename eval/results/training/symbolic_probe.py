"""Probe: can the tiny LM learn to locate when the image tokens are clean symbolic embeddings?

Image tokens are replaced by learned embeddings of each patch's colour / shape / character label plus
row and column; only the LLM (128 wide, 4 layers) trains, on answers. Prints train accuracy per
question family (fresh scenes every step, so it tracks generalisation).

    OMP_NUM_THREADS=1 python eval/results/training/symbolic_probe.py STEPS OUT.pt LR INIT_SCALE

INIT_SCALE 0 keeps transformers' 0.02 init (symbolic_probe_init002.log), 1.0 the fan-in init
(symbolic_probe_fanin.log).
"""
from pathlib import Path
import math, sys, time, random
from collections import Counter
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_tiny_llava as T
import vqa_data as D
from vqa_tokenizer import build_tokenizer

steps = int(sys.argv[1]); out = sys.argv[2]; lr = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
tok = build_tokenizer(); proc = T.build_processor(tok)
model = T.build_model(tok, 96, 4, 128, 4, 0)
init_std = float(sys.argv[4]) if len(sys.argv) > 4 else 0
if init_std:
    for mod in model.model.language_model.layers.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=init_std * mod.in_features ** -0.5)
pk = T.Packer(tok, proc.image_processor)
stream = T.Stream("train", 0, 8, start=0, rng_seed=0)
stream.p_simple, stream.max_objects = 0.3, 7
d = model.config.text_config.hidden_size


class Symbols(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Embedding(T.AUX_SIZES[0], d); self.s = nn.Embedding(T.AUX_SIZES[1], d)
        self.ch = nn.Embedding(T.AUX_SIZES[2], d); self.r = nn.Embedding(12, d); self.co = nn.Embedding(12, d)
        idx = torch.arange(144); self.register_buffer("ri", idx // 12); self.register_buffer("ci", idx % 12)

    def forward(self, lab):
        return self.c(lab[:, 0]) + self.s(lab[:, 1]) + self.ch(lab[:, 2]) + self.r(self.ri) + self.co(self.ci)


sym = Symbols()
lm = model.model.language_model
params = list(lm.parameters()) + list(model.lm_head.parameters()) + list(sym.parameters())
opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
t0 = time.time(); acc = Counter(); tot = Counter()
for step in range(1, steps + 1):
    for g in opt.param_groups:
        g["lr"] = lr * min(1, step / 100)
    images, qas, items = zip(*(stream.next() for _ in range(16)))
    batch = pk.batch(list(images), list(qas))
    labels = torch.stack([T.patch_labels(it) for it in items])
    feats = sym(labels)
    ids = batch["input_ids"]
    emb = lm.embed_tokens(ids)
    img = ids == model.config.image_token_id
    emb = emb.masked_scatter(img[..., None], feats.reshape(-1, d))
    o = lm(inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["position_ids"], use_cache=False)
    logits = model.lm_head(o.last_hidden_state[batch["rows"], batch["cols"]])
    loss = F.cross_entropy(logits, batch["targets"])
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    with torch.no_grad():
        ans = batch["is_answer"].tolist(); pred = logits.argmax(-1).tolist(); tg = batch["targets"].tolist()
        k = 0
        for b, qa in enumerate(qas):
            for q, a in qa:
                fam = "attribute" if q.startswith("what colour") or q.startswith("what shape") else \
                      "count" if q.startswith("how many") else "exist" if q.startswith("is there") else \
                      "spatial" if q.startswith("is the") else "text"
                # targets are (answer, eos) pairs in order
                acc[fam] += int(pred[2 * k] == tg[2 * k]); tot[fam] += 1; k += 1
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.3f} " + " ".join(f"{f}={acc[f]/tot[f]:.2f}" for f in sorted(tot))
              + f" elapsed {(time.time()-t0)/60:.1f}m", flush=True)
        acc.clear(); tot.clear()
torch.save({"lm": model.state_dict(), "sym": sym.state_dict()}, out)
