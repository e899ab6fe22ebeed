from common import *
import peft
fam_name = sys.argv[1] if len(sys.argv) > 1 else "llava"
F = FAMILIES[fam_name]
x = F.inputs(F.make()); lab = labels_of(x)
for name, cfg in [("prefix", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
                  ("prompt", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))]:
    def build(keep):
        m = F.make()
        if keep is not None: vtoken.wrap(m, "fastv", keep=keep)
        torch.manual_seed(7)
        return peft.get_peft_model(m, cfg())
    def t():
        try:
            p = build(None)
            with torch.no_grad(): a = p(**x).logits
            ga = gen(p, x)
        except Exception as e:
            print(f"   plain {name} fails too: {type(e).__name__}: {str(e)[:150]}"); return
        w = build(1.0)
        with torch.no_grad(): b = w(**x).logits
        if a.shape != b.shape or not torch.equal(a, b): return f"keep=1 differs {a.shape} {b.shape}"
        if not torch.equal(gen(w, x), ga): return "keep=1 generate differs"
        w = build(0.25)
        with torch.no_grad(): c = w(**x).logits
        gen(w, x)
        print("   budget shape", tuple(c.shape), "plain", tuple(a.shape))
    check(f"{fam_name} peft {name}-tuning", t)
