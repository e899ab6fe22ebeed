"""The TokenPacker projector as a stand-alone ``nn.Module`` (model-free: tensors in, tensors out).

TokenPacker (Li, Yuan, Liu, Tang, Wang, Qin, Zhu, Zhang, "TokenPacker: Efficient Visual Projector for
Multimodal LLM", IJCV 2025, arXiv 2407.02392 v4) replaces LLaVA's MLP projector by a coarse-to-fine
packer that emits one token per ``s x s`` region of the patch grid (§3.2 of the paper, "Coarse-to-Fine
Visual Projector"; the architecture below follows the official ``TokenPacker`` class in
``llava/model/multimodal_projector/builder.py``, see /work/shared/papers notes §3.2). The equation
numbers of arXiv v4 could not be checked here, so the steps cite the paper's section and the code.

For an image with patch grid ``h x w``:

1. **Point queries** (§3.2, "coarse point query"): the projector-input features (LLaVA's
   ``vision_feature_layer``, the penultimate CLIP layer) are downsampled by the scale factor ``s`` with
   bilinear interpolation (``align_corners=False``, computed in fp32 as the official code): one query per
   region, sampled at the region's centre. For ``s=2`` this is the 2x2 mean, for ``s=3`` the centre patch,
   for ``s=4`` the mean of the central 2x2. ``q = LN_q(W_q x_q)`` (``W_q`` without bias, LN eps 1e-6).
2. **Multi-level region keys and values** (§3.2, "region-to-point injection"): the hidden states of
   several vision layers (``layers``, hidden-state indices; [12, 16, 22, 23] of CLIP-L's 24) are
   concatenated on channels per patch; ``K = LN_k(MLP_k(x_multi))``, ``V = LN_v(MLP_v(x_multi))`` with
   ``MLP = Linear(L*d_v -> E), GELU, Linear(E -> E)``.
3. **Region-to-point injection**: multi-head attention (``E`` wide, ``E // 128`` heads as the official
   8 heads of 128 for E = 1024) of each query over the ``s x s`` keys of its own region only (regions are
   folded into the batch, as the official ``divide_feature``); no positional encoding, no FFN.
4. **Output MLP** to the LLM width: ``Linear(E -> d_llm), act, Linear(d_llm -> d_llm)``, the shape of
   LLaVA-1.5's projector.

Nothing is tied to CLIP-L/336: every width comes from :class:`PackerConfig` (built from the model's
configs by ``vtoken.train_projector``), and any grid works.

Grids not divisible by ``s`` (e.g. a 4x4 grid at ``s=3``): the grid is cut into ``ceil(h/s) x ceil(w/s)``
regions from the top-left, so the last row/column of regions is smaller (``h - s*floor(h/s)`` patches);
padding cells are masked out of the attention (they are never attended), and the point query of a
partial region is the bilinear sample at the centre of its real patches (which is exactly
``F.interpolate`` for full regions). The official code only handles 24 / s exactly.

Where paper and code differ: the paper says the injection "updates the coarse point query"; the official
code feeds the attention output alone to the MLP (no residual). ``residual=False`` (default) is the
official code, the published architecture, and with the official initialisation (trunc-normal 0.02 for
every Linear, zero biases, LayerNorm 1/0) what ``vtoken.train_projector`` trains by default
(``init="random"``). ``residual=True`` is vtoken's variant: it adds the interpolated query (pre-``W_q``)
to the injected value before the MLP, so that with a zeroed injection (``attn.out_proj`` = 0) and the
output MLP copied from the model's projector the packer starts exactly as "interpolate, then the
original projector" (``vtoken.train_projector(init="projector")``; at ``s=1`` it *is* the original
projector).

The packers shipped for the tiny LLaVA (``vtoken/assets/tiny-llava-trained/tokenpacker-s2`` and ``-s3``,
the trained rows of ``vtoken bench``) are that variant: ``residual=True``, trained from
``init="projector"`` (stage 1 only, 1000 steps of batch 8, lr 1e-3; their ``training_args.json`` and the
README there), not the published architecture. A released checkpoint's projector
(:meth:`TokenPackerModule.from_official`) is the published one.

Saving: ``save_pretrained(dir)`` writes ``packer_config.json`` (a tiny JSON of :class:`PackerConfig`) and
``packer.safetensors``; ``TokenPackerModule.from_pretrained(dir)`` reads them back (bit-identical). This
mirrors huggingface_hub's ``PyTorchModelHubMixin`` file layout idea without depending on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "packer_config.json"
WEIGHTS_NAME = "packer.safetensors"
#: Parameter names of the official ``TokenPacker`` class -> this module's.
_OFFICIAL_NAMES = {"q_proj_1.": "q_proj.", "k_proj_1.": "k_proj.", "v_proj_1.": "v_proj.", "ln_q_1.": "ln_q.",
                   "ln_k_1.": "ln_k.", "ln_v_1.": "ln_v.", "clip_attn.": "attn.", "mlp.": "mlp."}


def _read_state(source) -> dict:
    """A state dict from a dict, a ``.safetensors`` file or a ``torch.save`` file."""
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"no such checkpoint file {path!r}; pass the projector's .bin or .safetensors file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return read_weights(path, load_file)
    return read_weights(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def read_weights(path: str, read) -> dict:
    """``read(path)``, a file that cannot be read as weights refused in one line naming it."""
    try:
        return read(path)
    except Exception as error:  # safetensors' and pickle's own errors have no common base
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(f"cannot read weights from {path!r} ({reason}); is the file complete, or was it "
                         "written by another program?") from error

#: The official multi-level layers (hidden-state indices of a 24-layer CLIP-L, ``hidden_states[0]`` being
#: the embeddings), and the projector-input layer they were chosen relative to (``-2`` -> 23).
OFFICIAL_LAYERS = (12, 16, 22, 23)
OFFICIAL_FEATURE_LAYER = 23


def default_layers(feature_layer: int) -> list[int]:
    """The official layers [12, 16, 22, 23] (chosen for a 24-layer tower read at hidden state 23)
    scaled to a tower read at hidden state ``feature_layer``: ``j -> floor(j * F / 23 + 1/2)``, at least
    1, duplicates removed. F = 23 gives the official list; a 4-layer tower read at -2 (F = 3) gives [2, 3];
    F = 11 (12 layers) gives [6, 8, 11]. The last entry is always the projector-input layer itself."""
    if feature_layer < 1:
        raise ValueError(f"the projector-input hidden state must be >= 1 (an encoder layer), got {feature_layer}")
    scaled = [max(1, math.floor(j * feature_layer / OFFICIAL_FEATURE_LAYER + 0.5)) for j in OFFICIAL_LAYERS]
    return sorted(set(scaled))


@dataclass
class PackerConfig:
    """Everything that fixes a packer's shapes, saved as ``packer_config.json``.

    Attributes:
        query_dim: width of the point-query source (the original projector's input width).
        level_dim: width of one multi-level feature (the vision hidden size).
        llm_hidden: output width (the LLM hidden size).
        layers: hidden-state indices of the multi-level features (``hidden_states[j]`` = output of
            encoder layer ``j - 1``).
        scale: the region side ``s``; each ``s x s`` region becomes one token.
        embed_dim: attention width ``E`` (default: ``query_dim``, as the official 1024).
        num_heads: attention heads (default ``max(1, E // 128)``: the official 8 heads of 128).
        act: activation of the output MLP (a ``transformers`` ACT2FN name; LLaVA's ``projector_hidden_act``).
        mlp_bias: biases in the output MLP (LLaVA's ``multimodal_projector_bias``).
        residual: add the interpolated query to the injected value before the MLP (see module doc;
            False is the published architecture, True vtoken's variant the shipped packers use).
        eps: LayerNorm epsilon (official 1e-6).
        grid: ``[h, w]`` patch grid of the model it was trained for (fixes the token budget).
        vision_layers: depth of the vision tower it was trained for (checked at wrap time).
    """

    query_dim: int
    level_dim: int
    llm_hidden: int
    layers: list[int]
    scale: int = 2
    embed_dim: int | None = None
    num_heads: int | None = None
    act: str = "gelu"
    mlp_bias: bool = True
    residual: bool = False
    eps: float = 1e-6
    grid: list[int] | None = None
    vision_layers: int | None = None

    def __post_init__(self) -> None:
        if self.embed_dim is None:
            self.embed_dim = self.query_dim
        if self.num_heads is None:
            self.num_heads = max(1, self.embed_dim // 128)
        self.layers = [int(j) for j in self.layers]
        if not self.layers or min(self.layers) < 1 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct hidden-state indices >= 1, got {self.layers}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive integer (2, 3 or 4 in the paper), got {self.scale!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.residual and self.embed_dim != self.query_dim:
            raise ValueError("residual=True adds the query to the injected value: it needs embed_dim == query_dim")
        if self.grid is not None:
            self.grid = [int(v) for v in self.grid]

    @property
    def kv_dim(self) -> int:
        return self.level_dim * len(self.layers)

    def tokens(self, height: int, width: int) -> int:
        """Packed tokens of an ``height x width`` grid: ``ceil(h/s) * ceil(w/s)``."""
        return -(-height // self.scale) * -(-width // self.scale)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mlp(inp: int, hidden: int, act: nn.Module, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden, bias=bias), act, nn.Linear(hidden, hidden, bias=bias))


def _activation(name: str) -> nn.Module:
    from vtoken.compat import activation  # the same activation objects LLaVA's projector uses

    return activation(name)


def region_centres(size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear sampling along one axis of ``size`` cells cut into regions of ``scale``: for region i,
    the two neighbouring cells and the weight of the second, sampling at the centre of its real cells
    (``i*s + (r_i - 1)/2`` with ``r_i = min(s, size - i*s)``)."""
    count = -(-size // scale)
    start = torch.arange(count) * scale
    real = torch.clamp(size - start, max=scale)
    centre = start.double() + (real.double() - 1) / 2
    low = centre.floor().long()
    high = torch.clamp(low + 1, max=size - 1)
    return low, high, (centre - low.double()).float()


def point_queries(features: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, h, w, d]`` -> ``[B, ceil(h/s), ceil(w/s), d]``: one bilinear sample at each region's centre,
    in fp32 (returned in fp32). Divisible grids go through ``F.interpolate(mode="bilinear",
    align_corners=False)`` exactly as the official code; other grids sample each (possibly partial)
    region at the centre of its real cells, which is the same formula."""
    batch, height, width, dim = features.shape
    x = features.float()
    if scale == 1:
        return x
    if height % scale == 0 and width % scale == 0:
        image = x.permute(0, 3, 1, 2)
        out = F.interpolate(image, size=(height // scale, width // scale), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1)
    rows_lo, rows_hi, row_w = (t.to(x.device) for t in region_centres(height, scale))
    cols_lo, cols_hi, col_w = (t.to(x.device) for t in region_centres(width, scale))
    rows = x[:, rows_lo] * (1 - row_w)[None, :, None, None] + x[:, rows_hi] * row_w[None, :, None, None]
    return rows[:, :, cols_lo] * (1 - col_w)[None, None, :, None] + rows[:, :, cols_hi] * col_w[None, None, :, None]


def regions(features: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, h, w, d]`` -> ``[B * gh * gw, s*s, d]`` (regions row-major, each region's cells row-major)
    and a ``[B * gh * gw, s*s]`` mask, True for padding cells (grids not divisible by ``s``)."""
    batch, height, width, dim = features.shape
    gh, gw = -(-height // scale), -(-width // scale)
    pad_h, pad_w = gh * scale - height, gw * scale - width
    x = F.pad(features, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else features
    x = x.reshape(batch, gh, scale, gw, scale, dim).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * gh * gw, scale * scale, dim)
    real = torch.zeros(gh * scale, gw * scale, dtype=torch.bool, device=features.device)
    real[:height, :width] = True
    pad = ~real.reshape(gh, scale, gw, scale).permute(0, 2, 1, 3).reshape(gh * gw, scale * scale)
    return x, pad.repeat(batch, 1)


class TokenPackerModule(nn.Module):
    """The packer: ``forward(query [B, h, w, query_dim], levels [B, h, w, L*level_dim])`` ->
    ``[B, ceil(h/s) * ceil(w/s), llm_hidden]`` (regions row-major)."""

    def __init__(self, config: PackerConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.q_proj = nn.Linear(config.query_dim, e, bias=False)
        self.k_proj = _mlp(config.kv_dim, e, nn.GELU())  # Linear(L*d_v -> E), GELU, Linear(E -> E)
        self.v_proj = _mlp(config.kv_dim, e, nn.GELU())
        self.ln_q = nn.LayerNorm(e, eps=config.eps)
        self.ln_k = nn.LayerNorm(e, eps=config.eps)
        self.ln_v = nn.LayerNorm(e, eps=config.eps)
        self.attn = nn.MultiheadAttention(e, config.num_heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(e, config.llm_hidden, bias=config.mlp_bias),
            _activation(config.act),
            nn.Linear(config.llm_hidden, config.llm_hidden, bias=config.mlp_bias),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The official init: trunc_normal(0.02) for every Linear (the attention's out-projection
        # included; its packed in-projection keeps PyTorch's xavier init), zero biases, LN 1/0.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, query: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch, height, width, _ = query.shape
        if levels.shape[:3] != query.shape[:3]:
            raise ValueError(f"query grid {tuple(query.shape[:3])} and level grid {tuple(levels.shape[:3])} differ")
        if query.shape[-1] != cfg.query_dim or levels.shape[-1] != cfg.kv_dim:
            raise ValueError(
                f"this packer takes queries of width {cfg.query_dim} and {len(cfg.layers)} levels of width "
                f"{cfg.level_dim} ({cfg.kv_dim} in all); got {query.shape[-1]} and {levels.shape[-1]}"
            )
        dtype = self.q_proj.weight.dtype
        s = cfg.scale
        points = point_queries(query, s)  # fp32, as the official code
        gh, gw = points.shape[1:3]
        q = self.ln_q(self.q_proj(points.to(dtype))).reshape(batch * gh * gw, 1, -1)
        levels = levels.to(dtype)
        keys, pad = regions(self.ln_k(self.k_proj(levels)), s)
        values, _ = regions(self.ln_v(self.v_proj(levels)), s)
        mask = pad if bool(pad.any()) else None
        out = self.attn(q, keys, values, key_padding_mask=mask, need_weights=False)[0]
        out = out.reshape(batch, gh * gw, -1)
        if cfg.residual:
            out = out + points.reshape(batch, gh * gw, -1).to(out.dtype)
        return self.mlp(out)

    def flops(self, height: int, width: int) -> int:
        """Multiply-adds x 2 of one forward on an ``height x width`` grid (for honest FLOPs)."""
        cfg = self.config
        n, m, e, d = height * width, cfg.tokens(height, width), cfg.embed_dim, cfg.llm_hidden
        s2 = cfg.scale**2
        kv = 2 * (2 * n * cfg.kv_dim * e + 2 * n * e * e)  # two MLPs over every patch
        attention = 2 * m * e * e + 2 * 2 * (m * s2) * e * e + 2 * 2 * m * s2 * e + 2 * m * e * e
        return kv + 2 * m * cfg.query_dim * e + attention + 2 * m * e * d + 2 * m * d * d

    # --- saving -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``packer_config.json`` and ``packer.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        return str(directory)

    @classmethod
    def from_official(
        cls, source, *, scale: int = 2, layers=(12, 16, 22, 23), num_heads: int = 8, grid=(24, 24),
        vision_layers: int | None = 24, act: str = "gelu",
    ) -> "TokenPackerModule":
        """The projector of a released TokenPacker checkpoint (``CircleRadon/TokenPacker``'s
        ``TokenPacker`` class, e.g. the ``mm_projector.bin`` of LLaVA-TokenPacker-7b): ``source`` is a
        state dict or a ``.bin`` / ``.safetensors`` file; names map one to one (``q_proj_1`` ->
        ``q_proj``, ``clip_attn`` -> ``attn``, ...) after any prefix up to ``mm_projector.``; where some
        names hold ``mm_projector.`` (a released model's shard, the LLM's weights beside it) only those
        are read. Widths come from the tensors; what the weights do not fix comes from the official
        code's defaults:
        ``scale`` 2 (the released 144-token models; pass the ``scale_factor`` of others), the levels
        ``hidden_states[12, 16, 22, 23]``, 8 heads, the 24 x 24 grid of a 336 px CLIP-L/14 tower."""
        state = _read_state(source)
        if any("mm_projector." in name for name in state):  # a whole model's (shard's) weights: its projector
            state = {name.split("mm_projector.", 1)[1]: t for name, t in state.items() if "mm_projector." in name}
        renamed = {}
        for name, tensor in state.items():
            prefix = next((p for p in _OFFICIAL_NAMES if name.startswith(p)), None)
            if prefix is None:
                raise ValueError(
                    f"{name!r} is not a parameter of the official TokenPacker projector; expected names "
                    f"starting with {', '.join(_OFFICIAL_NAMES)}"
                )
            renamed[_OFFICIAL_NAMES[prefix] + name[len(prefix):]] = tensor
        missing = sorted({"q_proj.weight", "k_proj.0.weight", "mlp.2.weight"} - renamed.keys())
        if missing:
            raise ValueError(f"no TokenPacker projector in these weights: {', '.join(missing)} missing (official names "
                             f"q_proj_1, k_proj_1, mlp, ...)")
        embed, query_dim = renamed["q_proj.weight"].shape
        kv_dim = renamed["k_proj.0.weight"].shape[1]
        if kv_dim % len(layers):
            raise ValueError(f"the key projection takes {kv_dim} features, not a multiple of the {len(layers)} levels")
        config = PackerConfig(
            query_dim=query_dim, level_dim=kv_dim // len(layers), llm_hidden=renamed["mlp.2.weight"].shape[0],
            layers=list(layers), scale=scale, embed_dim=embed, num_heads=num_heads, act=act,
            mlp_bias="mlp.0.bias" in renamed, grid=list(grid), vision_layers=vision_layers,
        )
        module = cls(config)
        module.load_state_dict(renamed, strict=True)
        return module.to(dtype=renamed["q_proj.weight"].dtype).eval()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> "TokenPackerModule":
        """Load a packer written by :meth:`save_pretrained` (or ``vtoken.train_projector``)."""
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise ValueError(
                f"no TokenPacker weights in {directory!r}: expected {CONFIG_NAME} and {WEIGHTS_NAME} as written "
                "by vtoken.train_projector(...) / `vtoken train-projector` or TokenPackerModule.save_pretrained"
            )
        try:
            with open(config_path) as f:
                config = PackerConfig(**json.load(f))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{config_path} is not a TokenPacker config ({error}); rewrite it with "
                             "TokenPackerModule.save_pretrained or train the packer again") from error
        module = cls(config)
        state = read_weights(weights_path, load_file)
        module.load_state_dict(state)
        dtype = next(iter(state.values())).dtype
        module.to(dtype=dtype)
        if device is not None:
            module.to(device)
        return module.eval()

    # --- initialisation from a LLaVA projector ----------------------------------------------------
    def copy_output_mlp(self, linear_1: nn.Linear, linear_2: nn.Linear) -> None:
        """Copy an MLP projector's two linears into the output MLP (shapes must match)."""
        with torch.no_grad():
            for mine, theirs in ((self.mlp[0], linear_1), (self.mlp[2], linear_2)):
                if mine.weight.shape != theirs.weight.shape or (mine.bias is None) != (theirs.bias is None):
                    raise ValueError(
                        f"cannot copy the projector into the packer's output MLP: {tuple(theirs.weight.shape)} "
                        f"vs {tuple(mine.weight.shape)}; use init='random'"
                    )
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)

    def zero_injection(self) -> None:
        """Zero the attention's output projection: the injection then adds nothing."""
        with torch.no_grad():
            self.attn.out_proj.weight.zero_()
            if self.attn.out_proj.bias is not None:
                self.attn.out_proj.bias.zero_()


__all__ = ["PackerConfig", "TokenPackerModule", "default_layers", "point_queries", "regions", "OFFICIAL_LAYERS"]
