"""The public API: errors that name the fix and leave the model unchanged, exact unwrap, registry,
config files, selection and show."""

import json

import pytest
import torch

from vtoken import compat
from PIL import Image

import vtoken
from vtoken.registry import register
from vtoken.strategies.base import Strategy
from families import FAMILIES
from tiny import llava_inputs, tiny_llava, tiny_llava_next, llava_next_inputs


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def _snapshot(model, x):
    with torch.no_grad():
        logits = model(**x).logits
    return (
        logits,
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        _hooks(model),
        set(vars(model.model)),
    )


def _assert_same(model, x, snap):
    logits, state, types, hooks, attrs = snap
    with torch.no_grad():
        assert torch.equal(model(**x).logits, logits)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types
    assert _hooks(model) == hooks
    assert set(vars(model.model)) == attrs
    assert not hasattr(model, "_vtoken_state")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unwrap_restores_everything(name):
    model = FAMILIES[name].make()
    x = FAMILIES[name].inputs(model)
    snap = _snapshot(model, x)
    for method, options in [("fastv", {}), ("pool", {"site": "vision", "layer": 0}), ("random", {})]:
        if not FAMILIES[name].supports(options):
            continue
        vtoken.wrap(model, method, **options)
        with torch.no_grad():
            model(**x)
        model.generate(**x, max_new_tokens=2, do_sample=False)
        assert vtoken.unwrap(model) is model
        _assert_same(model, x, snap)


def test_wrap_twice_is_an_error_and_keeps_the_first_wrap():
    model = tiny_llava()
    vtoken.wrap(model, "random", keep=0.5)
    hooks = _hooks(model)
    with pytest.raises(ValueError, match="already wrapped with 'random'.*unwrap"):
        vtoken.wrap(model, "fastv")
    assert _hooks(model) == hooks and vtoken.config_of(model).method == "random"
    vtoken.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        vtoken.unwrap(model)


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("nope", {}, r"unknown method 'nope'; known methods: .*fastv.*pool.*random"),
        ("random", {"budget": 3}, r"unknown option\(s\) budget for method 'random'; its options are"),
        ("random", {"keep": 0.0}, r"keep must be a fraction in \(0, 1\]"),
        ("random", {"keep": 1.5}, r"keep must be a fraction in \(0, 1\]"),
        ("random", {"keep_tokens": 0}, r"keep_tokens must be a positive integer"),
        ("random", {"keep_tokens": 17}, r"keep_tokens=17 is larger than the 16 visual tokens"),
        ("random", {"keep": 0.5, "keep_tokens": 4}, r"exactly one budget"),
        ("fastv", {"site": "projector"}, r"cannot prune at the 'projector' site"),
        ("random", {"site": "llm", "layer": 9}, r"llm layer 9 does not exist: the LLM has 4 decoder layers"),
        ("random", {"site": "vision", "layer": 3}, r"vision layer 3 is at or after the layer LLaVA-1.5 reads"),
        ("random", {"site": "llm"}, r"needs `layer`"),
        ("random", {"positions": "shuffled"}, r"positions must be one of"),
    ],
)
def test_bad_options_raise_and_leave_the_model_unchanged(method, options, message):
    model = tiny_llava()
    x = llava_inputs(2)
    snap = _snapshot(model, x)
    with pytest.raises(ValueError, match=message):
        vtoken.wrap(model, method, **options)
    _assert_same(model, x, snap)


def test_model_without_adapter_is_refused():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no vtoken adapter handles Linear; supported families: llava"):
        vtoken.wrap(model, "random")
    assert not hasattr(model, "_vtoken_state")


def _llava_with_pixtral_tower():
    """LLaVA's class holding Pixtral's tower (as mistral-community/pixtral-12b does), at toy size."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(0)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8, head_dim=8)
    text = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=99, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("method", ["fastv", "random", "visionzip"])
def test_a_llava_class_with_a_tower_the_adapter_does_not_read_is_refused(method):
    """LLaVA's classes also hold towers other than CLIP and SigLIP: wrap names the tower in one line
    and leaves the model as it was (it used to fail on a missing attribute); the FLOPs model refuses
    it too, instead of counting it as a CLIP tower."""
    model = _llava_with_pixtral_tower()
    ids = torch.tensor([[1, 5, 6] + [99] * 16 + [7, 8]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 32, 32),
         "image_sizes": torch.tensor([[32, 32]])}
    snap = _snapshot(model, x)
    with pytest.raises(ValueError, match=r"reads CLIP and SigLIP vision towers; this model's is PixtralVisionModel "
                                         r"\(vision_config.model_type='pixtral'\)"):
        vtoken.wrap(model, method)
    _assert_same(model, x, snap)
    with pytest.raises(NotImplementedError, match="vision tower of model_type 'pixtral' is not implemented"):
        vtoken.flops(model.config)


def test_wrap_and_the_flops_model_refuse_the_same_llava_towers():
    """One list of towers for both: a LLaVA config holding a tower whose name contains "siglip" or
    "clip" but which is neither (SigLIP2's, patches of any aspect ratio) is refused by the FLOPs model
    as by wrap, instead of being counted as a SigLIP tower; CLIP's and SigLIP's are modelled."""
    from transformers import LlavaConfig, Siglip2VisionConfig, SiglipVisionConfig

    from vtoken.adapters.llava import VISION_TOWERS
    from vtoken.model_dims import LLAVA_VISION_TOWERS, model_dims

    assert VISION_TOWERS == LLAVA_VISION_TOWERS
    text = tiny_llava().config.text_config
    siglip2 = LlavaConfig(vision_config=Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, patch_size=8),
                          text_config=text, image_token_id=99)
    with pytest.raises(NotImplementedError, match="vision tower of model_type 'siglip2_vision_model' is not implemented"):
        vtoken.flops(siglip2)
    siglip = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8),
                         text_config=text, image_token_id=99)
    assert model_dims(siglip).vision.cls_tokens == 0
    assert model_dims(tiny_llava().config).vision.cls_tokens == 1


def test_runtime_errors_name_the_fix():
    model = tiny_llava()
    x = llava_inputs(2)
    snap = _snapshot(model, x)
    with vtoken.pruned(model, "random", keep=0.5):
        with pytest.raises(ValueError, match="no image tokens.*text_only='passthrough'"):
            model(input_ids=torch.tensor([[1, 5, 6, 7]]))
        # Image tokens without pixels are text, as to the plain model (an assistant model is called so).
        with torch.no_grad():
            as_text = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    with torch.no_grad():
        assert torch.equal(as_text, model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits)
    with vtoken.pruned(model, "random", keep=0.5, text_only="passthrough"):
        with torch.no_grad():
            text_only = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    with torch.no_grad():
        assert torch.equal(text_only, model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits)
    # A keep_tokens budget larger than an image's tokens, on a model whose count varies per image.
    nxt = tiny_llava_next()
    with vtoken.pruned(nxt, "random", keep_tokens=60):  # the three images have 52, 88 and 72 tokens
        with pytest.raises(ValueError, match=r"budget \(60 tokens\) exceeds the 52 visual tokens of image 0"):
            nxt(**llava_next_inputs(nxt))
    # A decoding step whose batch does not match the cache.
    with vtoken.pruned(model, "fastv", keep=0.5):
        out = model(**x, use_cache=True)
        with pytest.raises(ValueError, match="mismatched batch: this cache was filled for 2 samples but the input has 1"):
            model(input_ids=torch.tensor([[5]]), **compat.cache_kwargs(compat.output_cache(out)))
    _assert_same(model, x, snap)


def test_methods_lists_options_and_defaults():
    listed = {m["name"]: m for m in vtoken.methods()}
    assert {"random", "pool", "fastv"} <= set(listed)
    assert listed["fastv"]["options"]["layer"] == 2 and listed["fastv"]["default_keep"] == 0.5
    assert listed["fastv"]["sites"] == ["llm"]
    assert listed["pool"]["options"]["site"] == "projector"


def test_registry_refuses_a_taken_name():
    class Impostor(Strategy):
        name = "random"

    with pytest.raises(ValueError, match="a strategy named 'random' is already registered"):
        register(Impostor)


def test_config_saves_and_loads(tmp_path):
    model = tiny_llava()
    x = llava_inputs(3)
    stages = [{"site": "vision", "layer": 0, "keep": 0.75}, {"site": "llm", "layer": 2, "keep": 0.5}]
    with vtoken.pruned(model, "random", stages=stages, seed=7, positions="contiguous"):
        path = vtoken.save_config(model, tmp_path)
        with torch.no_grad():
            first = model(**x).logits
        first_sel = vtoken.selection(model)
    saved = json.loads(open(path).read())
    assert saved["method"] == "random" and saved["seed"] == 7 and saved["stages"] == stages
    config = vtoken.load(tmp_path)
    for setup in ({"config": config}, {"config": tmp_path}):
        with vtoken.pruned(model, **setup):
            with torch.no_grad():
                assert torch.equal(model(**x).logits, first)
            again = vtoken.selection(model)
        assert all(torch.equal(again[b][k], first_sel[b][k]) for b in range(3) for k in first_sel[b])


def test_selection_reports_every_stage_within_the_sample():
    model = tiny_llava()
    x = llava_inputs(3)
    stages = [{"site": "vision", "layer": 1, "keep": 0.75}, {"site": "projector", "keep": 0.5},
              {"site": "llm", "layer": 2, "keep_tokens": 4}]
    with vtoken.pruned(model, "random", stages=stages):
        with pytest.raises(ValueError, match="no forward pass"):
            vtoken.selection(model)
        with torch.no_grad():
            model(**x)
        selection = vtoken.selection(model)
    for per_sample in selection:
        assert list(per_sample) == ["vision:1", "projector", "llm:2"]
        sizes = [len(v) for v in per_sample.values()]
        assert sizes == [12, 8, 4]
        vision, projector, llm = (set(v.tolist()) for v in per_sample.values())
        assert llm <= projector <= vision <= set(range(16))


def test_show_draws_kept_patches(tmp_path):
    """Pruning: kept patches bright, the others dimmed, over a picture enlarged to a legible size (a
    64 px image drawn at 384 px)."""
    model = tiny_llava()
    x = llava_inputs(1)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    with vtoken.pruned(model, "random", keep_tokens=4):
        with torch.no_grad():
            model(**x)
        path = vtoken.show(model, image, tmp_path / "kept.png")
        kept = set(vtoken.selection(model)[0]["projector"].tolist())
    drawn = Image.open(path).convert("RGB")
    assert drawn.size == (384, 384)
    for r in range(4):
        for c in range(4):
            value = drawn.getpixel((c * 96 + 48, r * 96 + 48))[0]
            assert (value == 200) == (r * 4 + c in kept)


def test_show_takes_the_pixel_values_of_a_batch_of_one_and_refuses_what_is_no_image(tmp_path):
    """The processor's [1, 3, H, W] pixel values draw as their image (PIL's TypeError before); an empty
    tensor, a batch of several and no output path are one-line ValueErrors."""
    model = tiny_llava()
    x = llava_inputs(1)
    with vtoken.pruned(model, "random", keep_tokens=4):
        with torch.no_grad():
            model(**x)
        assert Image.open(vtoken.show(model, x["pixel_values"], tmp_path / "a.png")).size == (384, 384)
        for image in (torch.rand(3, 0, 0), torch.rand(2, 3, 32, 32)):
            with pytest.raises(ValueError, match=r"show\(\) draws one image: .*pass one image of the batch"):
                vtoken.show(model, image, tmp_path / "b.png")
        with pytest.raises(ValueError, match="give the PNG's path to write, got NoneType"):
            vtoken.show(model, x["pixel_values"][0], None)
        # A picture path that is missing, a directory or not a picture: one line naming it.
        (tmp_path / "notes.txt").write_text("not a picture")
        for image, problem in ((tmp_path / "missing.png", "no image file at"), (tmp_path, "cannot read"),
                               (tmp_path / "notes.txt", "cannot read")):
            with pytest.raises(ValueError, match=rf"show\(\): {problem} .*{image.name}") as error:
                vtoken.show(model, image, tmp_path / "c.png")
            assert "\n" not in str(error.value) and error.value.__cause__ is None
        assert not (tmp_path / "c.png").exists()


def test_show_draws_each_pooled_token_over_its_whole_window(tmp_path):
    """pool to 2x2: every patch of a window shares its pooled token's tint, the four windows differ."""
    model = tiny_llava()
    x = llava_inputs(1)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    with vtoken.pruned(model, "pool", keep_tokens=4):
        with torch.no_grad():
            model(**x)
        drawn = Image.open(vtoken.show(model, image, tmp_path / "pooled.png")).convert("RGB")
    colour = {(r, c): drawn.getpixel((c * 96 + 48, r * 96 + 48)) for r in range(4) for c in range(4)}
    windows = {(r, c): (r // 2, c // 2) for r in range(4) for c in range(4)}
    for a in colour:
        for b in colour:
            assert (colour[a] == colour[b]) == (windows[a] == windows[b]), (a, b)


@pytest.mark.parametrize("method,options", [("tome", {}), ("repshift", {"mode": "merge"})])
def test_show_tints_what_a_vision_stage_merged_on_a_llava(method, options, tmp_path):
    """A merging vision stage on LLaVA-1.5 (ToMe, Representation Shift's merge) was drawn as plain
    pruning: merged patches dimmed as if dropped. Every patch ToMe folds is held by a kept token:
    each of the 16 patches is tinted, one tint per kept token, as many tints as tokens kept."""
    model = tiny_llava()
    x = llava_inputs(1)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    with vtoken.pruned(model, method, keep=0.4, **options):
        with torch.no_grad():
            model(**x)
        kept = list(vtoken.selection(model)[0].values())[-1]
        drawn = Image.open(vtoken.show(model, image, tmp_path / "merged.png")).convert("RGB")
    colour = [drawn.getpixel((c * 96 + 48, r * 96 + 48)) for r in range(4) for c in range(4)]
    dim = tuple(round(0.25 * 200) for _ in range(3))
    tinted = [c for c in colour if max(abs(a - b) for a, b in zip(c, dim)) > 2]
    assert len(set(tinted)) == len(kept) < 16
    if method == "tome":  # (ToMe merges every token it removes: nothing dropped)
        assert len(tinted) == 16
    for token in kept.tolist():  # each kept token's own patch carries a tint
        assert colour[token] in tinted


def _tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    return CLIPVisionModel(config).eval()  # a 4 x 4 grid: 16 patches


TOO_BIG = 10**400


@pytest.mark.parametrize(
    "method,options,message",
    [
        # Wrongly typed options name the option, the value and what it takes (a bool is no number).
        ("random", {"keep": "0.5"}, r"keep must be a fraction in \(0, 1\] \(a number, not a string or bool\), got '0.5'"),
        ("random", {"keep": True}, r"keep must be a fraction .*got True"),
        ("random", {"keep_tokens": True}, r"keep_tokens must be a positive integer .*got True"),
        ("random", {"keep_tokens": "4"}, r"keep_tokens must be a positive integer .*got '4'"),
        ("random", {"keep_tokens": TOO_BIG}, r"keep_tokens must be a positive integer below 2\*\*63 .*about 401 digits"),
        ("aif", {"keep_tokens": TOO_BIG}, r"keep_tokens must be a positive integer below 2\*\*63"),
        ("random", {"site": "llm", "layer": 1.5}, r"layer must be a layer index \(an integer >= 0\), got 1.5"),
        ("random", {"site": "llm", "layer": "1"}, r"layer must be a layer index \(an integer >= 0\), got '1'"),
        ("random", {"site": "llm", "layer": True}, r"layer must be a layer index .*got True"),
        ("random", {"stages": [1]}, r"each entry of stages must be a dict like .*got 1"),
        ("random", {"stages": {"site": "projector", "keep": 0.5}}, r"stages must be a list of dicts"),
        ("random", {"stages": [{"site": "projector", "kep": 0.5}]}, r"unknown key\(s\) kep in a stage; a stage takes"),
        ("random", {"stages": [{"layer": 1, "keep": 0.5}]}, r"a stage needs its site: add 'site': 'vision', 'projector' or 'llm'"),
        ("random", {"stages": []}, r"stages=\[\] holds no stage; give at least one stage dict, or omit stages"),
        ("random", {"stages": 0}, r"stages must be a list of dicts like .*got 0"),
        ("random", {"cls": 1}, r"unknown option\(s\) cls for method 'random'"),
        ("zoo_prune", {"precision": ["float32"]}, r"precision must be one of .*got \['float32'\]"),
        ("zoo_prune", {"directions": 10**30}, r"directions \(m\) must be a positive integer up to 2\*\*20"),
        ("vflowopt", {"newline_importance": float("nan")}, r"newline_importance must be a finite number, got nan"),
        ("transprune", {"keep_ratios": [0.5]}, r"the default schedule prunes at 3 layers .*but 1 keep_ratios were given; give prune_layers="),
        ("random", {"seed": "a"}, r"seed must be an integer .*got 'a'"),
        ("random", {"seed": 2**64}, r"seed must be an integer \(a 64-bit value"),
        # Setups that used to fail only at the first forward.
        ("random", {"stages": [{"site": "vision", "layer": 0, "keep": 0.25}, {"site": "vision", "layer": 1, "keep": 0.5}]},
         r"stage vision:1 keeps 8 tokens per image, more than the 4 the earlier stage vision:0 leaves"),
        ("random", {"stages": [{"site": "vision", "layer": 0, "keep_tokens": 4}, {"site": "projector", "keep": 0.5}]},
         r"stage projector keeps 8 tokens per image, more than the 4 the earlier stage vision:0 leaves"),
        ("random", {"stages": [{"site": "projector", "keep": 0.25}, {"site": "llm", "layer": 2, "keep_tokens": 5}]},
         r"give llm:2 a budget of at most 4 tokens"),
        ("pool", {"stages": [{"site": "vision", "layer": 0, "keep": 0.75}, {"site": "vision", "layer": 1, "keep": 0.25}]},
         r"pool needs each image's full patch grid, but stage vision:1 follows vision:0.*give pool one stage"),
        ("aif", {"keep_tokens": 1000}, r"keep_tokens=1000 is larger than the 16 visual tokens of an image"),
        (None, {"config": {"keep": 0.5}}, r"the config dict has no 'method' key; add one"),
        (None, {"config": 5}, r"config must be a config object, a dict or the path of a saved config, got int"),
        ("transprune", {"prune_layers": [10]}, r"transprune prune_layers=\[10\]: layer 10 does not exist, the LLM has 4"),
        # Methods that build their own stages from keep / keep_tokens check them as every method does.
        ("transprune", {"keep": "0.5"}, r"keep must be a fraction in \(0, 1\] \(a number, not a string or bool\)"),
        ("transprune", {"keep": 0.5, "keep_tokens": 8}, r"give exactly one budget"),
        ("tome", {"keep": True}, r"keep must be a fraction .*got True"),
        # A layer past the model is named against the model's depth, not the paper's 32 layers.
        ("transprune", {"layer": 99}, r"transprune layer=99: layer 99 does not exist, the LLM has 4 decoder layers"),
        ("transprune", {"accumulate_layers": [99]}, r"accumulate_layers \[99\] go beyond the LLM's 4 layers"),
        ("vflowopt", {"recycle": "no"}, r"recycle must be True or False, got 'no'"),
        ("vflowopt", {"newline_importance": "x"}, r"newline_importance must be a number, got 'x'"),
        ("vflowopt", {"r2": None}, r"r2 must be a number, got None"),
        ("vflowopt", {"llm_layers": 5}, r"llm_layers must be a list of LLM layer indices, got 5"),
        ("vflowopt", {"image_std": None}, r"image_std must be a list of 3 numbers"),
        ("vflowopt", {"vision_layer": True}, r"vision_layer must be a layer index >= 0, got True"),
        ("visionzip", {"vision_layer": True}, r"vision_layer must be a layer index >= 0, got True"),
        (["fastv"], {}, r"a method is named by a string, got list \['fastv'\]"),
        (None, {"config": {"method": ["fastv"]}}, r"a method is named by a string, got list"),
        (None, {"config": "/no/such/vtoken/dir"}, r"no vtoken config at '/no/such/vtoken/dir': write one with "
         r"vtoken.save_config"),
    ],
)
def test_bad_options_are_refused_at_wrap_in_one_line(method, options, message):
    model = tiny_llava()
    x = llava_inputs(2)
    snap = _snapshot(model, x)
    with pytest.raises(ValueError, match=message) as error:
        vtoken.wrap(model, method, **options)
    assert "\n" not in str(error.value)
    _assert_same(model, x, snap)


def test_budgets_that_grow_are_refused_where_the_counts_vary():
    """LLaVA-NeXT's token count depends on the image: fractions are compared with fractions."""
    model = tiny_llava_next()
    stages = [{"site": "projector", "keep": 0.25}, {"site": "llm", "layer": 2, "keep": 0.5}]
    with pytest.raises(ValueError, match=r"stage llm:2 \(keep=0.5\) keeps more than the earlier stage projector \(keep=0.25\)"):
        vtoken.wrap(model, "random", stages=stages)
    assert not vtoken.is_wrapped(model) and _hooks(model) == 0


def test_setups_next_to_the_refused_ones_still_run():
    model = tiny_llava()
    x = llava_inputs(2)
    for method, options in [
        ("pool", {"stages": [{"site": "vision", "layer": 0, "keep": 1.0}, {"site": "projector", "keep_tokens": 4}]}),
        ("random", {"stages": [{"site": "vision", "layer": 0, "keep": 0.5}, {"site": "projector", "keep_tokens": 8}]}),
        ("random", {"keep": 1, "seed": -1}),
        ("aif", {"keep_tokens": 16}),
    ]:
        with vtoken.pruned(model, method, **options):
            with torch.no_grad():
                model(**x)
    # A config dict without its method takes the one named in the call.
    with vtoken.pruned(model, "random", config={"keep": 0.5}):
        assert vtoken.config_of(model).method == "random" and vtoken.config_of(model).keep == 0.5


def test_flops_of_a_wrapped_vision_model_follow_image_size():
    from vtoken.schedule import Schedule, Stage

    model = _tiny_clip_vision()
    vtoken.wrap(model, "random", site="vision", layer=0, keep=0.5)
    report = vtoken.flops(model, image_size=(64, 64))  # an 8 x 8 grid: 64 patches, 32 after layer 0
    vtoken.unwrap(model)
    expected = vtoken.flops(model, Schedule((Stage("vision", 32, layer=0),)), image_size=(64, 64))
    assert report.patches == 64 and report.prefill == expected.prefill
    assert report.block_tokens == expected.block_tokens


def test_flops_refuses_zero_images():
    with pytest.raises(ValueError, match="images must be a positive number of images per sample, got 0"):
        vtoken.flops(tiny_llava(), images=0)


def test_a_layer_past_any_model_is_refused_before_it_is_printed():
    from tiny import tiny_llava

    model = tiny_llava()
    for layer in (10**5000, -10**5000):
        with pytest.raises(ValueError, match=r"^layer must be a layer index of the model .* bits$"):
            vtoken.wrap(model, "pool", keep=0.5, site="vision", layer=layer)
    assert not hasattr(model, "_vtoken_state")


def test_a_tower_read_from_its_first_layer_has_no_vision_layer_to_offer():
    """vision_feature_layer naming the tower's first block (as one of a list can): the refusal says no
    vision layer comes first and names the sites that remain, instead of 'a vision layer <= -1'."""
    model = tiny_llava()
    model.config.vision_feature_layer = -model.config.vision_config.num_hidden_layers
    x = llava_inputs(2)
    snap = _snapshot(model, x)
    with pytest.raises(ValueError, match=r"reads its features from \(layer 0, .*\); no vision layer comes before it, "
                                         r"so prune at the projector or in the LLM"):
        vtoken.wrap(model, "random", site="vision", layer=0, keep=0.5)
    _assert_same(model, x, snap)


def test_llava_next_on_a_tower_without_cls_names_the_sites_that_remain():
    """LLaVA-NeXT on a SigLIP tower (no CLS) read in full: vision-site pruning is refused, and the
    message does not send the user to 'default' (which would drop a real patch there)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, SiglipVisionConfig

    from tiny import IMAGE_TOKEN, _text

    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=4, num_attention_heads=4)
    config = LlavaNextConfig(vision_config=vision, text_config=_text(), image_token_id=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="full",
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    model = LlavaNextForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"^vision-site pruning on LLaVA-NeXT needs a tower with a CLS token .*"
                                         r"this tower has no CLS token: use the projector site"):
        vtoken.wrap(model, "random", site="vision", layer=1, keep=0.5)
    assert not vtoken.is_wrapped(model)
    vtoken.wrap(model, "random", keep=0.5)  # the projector site runs
    vtoken.unwrap(model)


def test_bad_paths_and_values_outside_wrap_are_refused_in_one_line(tmp_path):
    """What a wrapped model's helpers are handed: a config file that is not one, a file where a
    directory is needed, a schedule for a count that is no count, the oracle's annotations of the
    wrong shape (each used to raise a bare FileExistsError, JSONDecodeError or TypeError)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vtoken_config.json").write_text("{")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "vtoken_config.json").write_text("[1, 2]")
    model = vtoken.wrap(tiny_llava(), "fastv", keep=0.25)
    x = llava_inputs(1)
    with torch.no_grad():
        model(**x)
    cases = [
        (lambda: vtoken.load(broken), r"broken/vtoken_config.json is not a vtoken config: not valid JSON"),
        (lambda: vtoken.load(listed), r"it needs a JSON object with a 'method' key"),
        (lambda: vtoken.load(3), r"give the path of a vtoken config"),
        (lambda: vtoken.load({"method": "fastv"}), r"give the path of a vtoken config"),
        (lambda: vtoken.save_config(model, a_file), r"cannot make the directory .*a_file' \(File exists\)"),
        (lambda: vtoken.show(model, Image.new("RGB", (32, 32)), a_file / "kept.png"), r"cannot write the picture to"),
        (lambda: vtoken.schedule_of(model, visual_tokens=0), r"visual_tokens must be a count .* >= 1, got 0"),
        (lambda: vtoken.schedule_of(model, visual_tokens=True), r"visual_tokens must be a count .*got True"),
        (lambda: vtoken.wrap(None, "fastv"), r"vtoken.wrap takes a torch model .*got NoneType"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert a_file.read_text() == "x"
    oracle = vtoken.wrap(tiny_llava(), "oracle", keep=0.25)
    for relevant, message in (("x", r"relevant must be one list of token indices"),
                              ([["a"]], r"relevant must be one list of token indices"),
                              ([[-1]], r"relevant token -1 of image 0 is negative"),
                              # (past the image's tokens it matched nothing: a silent random fill)
                              ([[3, 300]], r"relevant token 300 of image 0 is past its 16 visual tokens; give "
                                           r"image-local indices 0..15")):
        with vtoken.annotate(oracle, relevant=relevant), pytest.raises(ValueError, match=message), torch.no_grad():
            oracle(**x)


@pytest.mark.filterwarnings("ignore:zoo_prune. the projector's sensitivity is the same")
def test_big_integer_options_reach_torch_as_floats():
    """VFlowOpt's t / a / alpha and ZOO-Prune's flat_rtol given as integers past 64 bits pass their
    range checks; they are floats from then on (torch raised an OverflowError at the first forward)."""
    model = tiny_llava()
    for method, options in (("vflowopt", {"t": 10**30}), ("vflowopt", {"a": 10**30}), ("vflowopt", {"alpha": 10**30}),
                            ("zoo_prune", {"flat_rtol": 10**30})):
        with vtoken.pruned(model, method, **options), torch.no_grad():
            assert all(isinstance(getattr(vtoken.config_of(model), k), float) for k in options)
            try:
                model(**llava_inputs(1))
            except ValueError as error:  # a one-line refusal of the method's own is fine, torch's overflow is not
                assert "\n" not in str(error) and "flat" in str(error), error


def test_save_config_where_it_cannot_write_is_one_line(tmp_path):
    """A directory named like the config file, or no path at all: one line, not an OSError / TypeError."""
    model = tiny_llava()
    vtoken.wrap(model, "random", keep=0.5)
    (tmp_path / "vtoken_config.json").mkdir()
    with pytest.raises(ValueError, match=r"cannot write .*vtoken_config.json' \(Is a directory\); give a directory"):
        vtoken.save_config(model, tmp_path)
    with pytest.raises(ValueError, match=r"give the directory to hold vtoken_config.json as a path, got None"):
        vtoken.save_config(model, None)


def test_config_of_is_a_copy_and_wrap_copies_the_config_it_is_given(tmp_path):
    """Changing what config_of returns, or the config object a model was wrapped with, changes
    neither what the model runs nor what save_config writes (both were the model's live config:
    keep=0.75 set on it made a model keeping 4 of 16 tokens report and save 12)."""
    x = llava_inputs(2)
    first, second = tiny_llava(), tiny_llava()
    vtoken.wrap(first, "fastv", keep=0.25)
    shown = vtoken.config_of(first)
    shown.keep = 0.75
    vtoken.wrap(second, config=shown)
    shown.keep = 0.5  # after wrapping: the second model keeps what it was wrapped with
    with torch.no_grad():
        first(**x)
        second(**x)
    assert [len(s["llm:2"]) for s in vtoken.selection(first)] == [4, 4]
    assert [len(s["llm:2"]) for s in vtoken.selection(second)] == [12, 12]
    assert vtoken.config_of(first).keep == 0.25 and vtoken.config_of(second).keep == 0.75
    assert vtoken.config_of(first) is not vtoken.config_of(first)
    assert vtoken.load(vtoken.save_config(first, tmp_path)).keep == 0.25


def test_numpy_and_fraction_options_are_plain_numbers():
    """NumPy scalars and Fractions are what a sweep's arrays hand over: wrap takes them as the Python
    numbers they stand for, so the first forward runs (a NumPy seed raised a raw TypeError in
    torch.Generator.manual_seed there), ToMe's r is accepted like keep_tokens, and save_config writes
    them (json raised on int64 and left half a file)."""
    np = pytest.importorskip("numpy")
    from fractions import Fraction

    model, x = tiny_llava(), llava_inputs(2)
    with vtoken.pruned(model, "random", keep=0.5, seed=3), torch.no_grad():
        model(**x)
        expected = vtoken.selection(model)
    cases = (("random", {"keep": np.float32(0.5), "seed": np.int64(3)}),
             ("random", {"keep": Fraction(1, 2), "seed": np.uint64(3)}),
             ("fastv", {"keep_tokens": np.int64(4), "layer": np.int64(2)}),
             ("fastv", {"stages": [{"site": "llm", "layer": np.int32(2), "keep_tokens": np.int16(4)}]}),
             ("tome", {"r": np.int64(2)}),
             ("transprune", {"prune_layers": [np.int64(1)], "keep_ratios": [np.float64(0.5)]}))
    for method, options in cases:
        with vtoken.pruned(model, method, **options), torch.no_grad():
            model(**x)
            config = vtoken.config_of(model)
            values = [v for k, v in vars(config).items() if not k.startswith("_")]
            values += [v for stage in config.stages or [] for v in stage.values()]
            values += [v for k in ("prune_layers", "keep_ratios") for v in getattr(config, k, None) or []]
            assert all(type(v) in (int, float, str, bool, list, dict, type(None)) for v in values), config
            if method == "random":
                assert all(torch.equal(a["projector"], b["projector"]) for a, b in zip(vtoken.selection(model), expected))
            saved = json.loads(json.dumps(config.to_dict()))
            assert vtoken.wrap(tiny_llava(), config=saved) is not None


def test_save_config_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    """The file is written beside its place and moved there: a write that fails leaves the config
    saved before (not half a file vtoken.load would refuse) and no temporary file."""
    import os

    model = tiny_llava()
    vtoken.wrap(model, "random", keep=0.5)
    path = vtoken.save_config(model, tmp_path)
    before = open(path).read()
    vtoken.unwrap(model)
    vtoken.wrap(model, "random", keep=0.25)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ValueError, match=r"cannot write .*vtoken_config.json' \(No space left on device\)"):
        vtoken.save_config(model, tmp_path)
    assert open(path).read() == before and sorted(p.name for p in tmp_path.iterdir()) == ["vtoken_config.json"]
    assert vtoken.load(tmp_path).keep == 0.5


def test_flops_refuses_an_unknown_dtype_and_a_bad_visual_token_count_in_one_line():
    model = tiny_llava()
    for call, message in ((lambda: vtoken.flops(model, dtype="bogus"), r"dtype must be a torch dtype or its name .* got 'bogus'"),
                          (lambda: vtoken.kv_cache_bytes(model, dtype=3), r"dtype must be a torch dtype .* got 3"),
                          (lambda: vtoken.flops(model, visual_tokens=2.5), r"visual_tokens must be a count .* got 2.5"),
                          (lambda: vtoken.flops(model, visual_tokens=0), r"visual_tokens must be a count .* got 0"),
                          (lambda: vtoken.kv_cache_bytes(model, visual_tokens=-1), r"visual_tokens must be a count .* got -1")):
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert vtoken.flops(model, dtype=torch.bfloat16).dtype == "bfloat16"
    assert vtoken.kv_cache_bytes(model, dtype="torch.float32") == 2 * vtoken.kv_cache_bytes(model, dtype="float16")


def test_show_refuses_an_index_that_is_not_one():
    """show(sample=1.0) raised list indexing's TypeError; an image_in_sample past the sample's images an
    IndexError."""
    model, x = tiny_llava(), llava_inputs(3)
    with vtoken.pruned(model, "random", keep=0.5), torch.no_grad():
        model(**x)
        image = Image.new("RGB", (32, 32))
        for kwargs, message in (({"sample": 1.0}, r"sample must be a whole number >= 0 \(an index\), got 1.0"),
                                ({"sample": -1}, r"sample must be a whole number >= 0"),
                                ({"image_in_sample": 1}, r"sample 0 of the last forward has 1 image\(s\); give "
                                                         r"image_in_sample 0..0")):
            with pytest.raises(ValueError, match=message):
                vtoken.show(model, image, "unused.png", **kwargs)
