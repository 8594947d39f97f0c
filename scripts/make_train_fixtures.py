#!/usr/bin/env python3
"""Generate the CLIP fine-tuning test fixtures in tests/fixtures/train/ (developer-run; the output is committed).

Command (from the repository root), in the virtual environment of scripts/make_clip_fixtures.py
(torch 2.15.0, transformers 5.24.0, safetensors 0.8.0, pillow 13.0.0, numpy 2.4.6):

    /tmp/refvenv/bin/python scripts/make_train_fixtures.py            # (re)write tests/fixtures/train/
    /tmp/refvenv/bin/python scripts/make_train_fixtures.py --verify   # regenerate into a temporary
                                                                      # folder, compare byte for byte

Base model: tests/fixtures/clip/models/tiny-quickgelu (made by make_clip_fixtures.py). The data are
8 synthetic PNGs (coloured shapes, 32x32 .. 48x40) with captions. The reference trainer is plain
torch, written out step by step (no HF Trainer): batches in order, CLIP contrastive loss, global
grad-norm clipping at 1.0, AdamW (weight decay 0.2 on tensors with ndim >= 2 only, open_clip's
rule), open_clip's cosine schedule with linear warmup, logit_scale clamped to [0, ln 100] after each
step. Three cases: full fine-tune (batch 4), vision tower frozen, and gradient accumulation (batch 2
x 2 micro-batches). Everything runs on the CPU in float32 with one thread and deterministic
algorithms, so a rerun with the same versions writes byte-identical files (`--verify` checks that).

Output (see tests/fixtures/train/README.md, written by this script, for the details):
    images/00.png .. 07.png   the training images
    pairs.json                [{"image": "images/00.png", "caption": "..."}, ...] in training order
    reference.safetensors     losses, lrs, grad norms, step-0 gradients, weights after 4 steps, pixels
    reference.json            versions, recipe, token ids, losses/lrs, parameter list and groups, checks
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

import fixture_common  # scripts/fixture_common.py (scripts/ is on sys.path when run as a script)
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "tests" / "fixtures" / "clip" / "models" / "tiny-quickgelu"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "train"
COMMAND = "/tmp/refvenv/bin/python scripts/make_train_fixtures.py"
TOKEN_EMB = "text_model.embeddings.token_embedding.weight"
VISION_PREFIXES = ("vision_model.", "visual_projection.")

# ----------------------------------------------------------------------------------------------
# Recipe (what the Rust trainer implements)
# ----------------------------------------------------------------------------------------------

RECIPE = {
    "epochs": 2,
    "batch_size": 4,
    "accumulation_steps": 1,
    "shuffle": False,
    "optimizer_steps": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "total_steps": 4,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.2,
    "weight_decay_rule": "weight_decay for parameters with ndim >= 2, 0.0 for ndim < 2 (biases, layer "
                         "norms, class_embedding, logit_scale) -- open_clip's rule",
    "max_grad_norm": 1.0,
    "logit_scale_clamp": [0.0, math.log(100.0)],
}

# The exact arithmetic, for whoever re-implements it (torch 2.15, float32 throughout).
ARITHMETIC = {
    "batches": "the pair order is [0..7] repeated for each epoch (no shuffle); optimizer step s takes "
               "the next batch_size * accumulation_steps pairs, split into accumulation_steps "
               "micro-batches of batch_size",
    "text": "CLIPTokenizer(captions, padding=True) per micro-batch: right-padded with 49407 to the longest "
            "caption, attention_mask 0 on the pads; pooled at the first 49407 (padding cannot matter: "
            "causal mask)",
    "loss": "img = visual_projection(vision pooled), txt = text_projection(text pooled); each divided by "
            "(sum(x^2, -1))^0.5; logits_per_text = (txt @ img.T) * exp(logit_scale); loss = "
            "(CE(logits_per_text, arange(B)) + CE(logits_per_text.T, arange(B))) / 2, mean reduction. "
            "This is CLIPModel(..., return_loss=True).loss, which is what is used",
    "accumulation": "each micro-batch's loss is divided by accumulation_steps before backward (grads "
                    "summed); negatives only within a micro-batch; the reported step loss is the mean of "
                    "the micro-batch losses",
    "clip": "torch.nn.utils.clip_grad_norm_(trainable params, 1.0, foreach=False): total = "
            "vector_norm(stack([vector_norm(g) for g in grads])); coef = min(1.0 / (total + 1e-6), 1.0); "
            "every grad *= coef (also when coef == 1). grad_norms records total (before clipping)",
    "lr": "step s (0-based): s < warmup: lr * (s + 1) / warmup; else e = s - warmup, es = total - warmup, "
          "0.5 * (1 + cos(pi * e / es)) * lr (open_clip's cosine_lr); computed in float64, set on both "
          "groups before optimizer.step()",
    "adamw": "torch.optim.AdamW(foreach=False), per parameter, t = step count from 1: "
             "p *= 1 - lr * wd (skipped when wd == 0); m.lerp_(g, 1 - beta1) [torch's lerp: m + 0.1 * (g - m)]; "
             "v = v * beta2 + (1 - beta2) * g * g [mul_ then addcmul_]; bc1 = 1 - beta1^t, bc2 = 1 - "
             "beta2^t (float64); denom = sqrt(v) / sqrt(bc2) + eps; p += -(lr / bc1) * m / denom "
             "[addcdiv_]. Weight decay applies to EVERY row of the token embedding (also rows whose grad "
             "is zero), Adam's update is zero on rows whose m is zero",
    "logit_scale": "after each optimizer.step(): logit_scale.clamp_(0, ln 100) in place (open_clip); "
                   "transformers itself never clamps it",
    "frozen_vision": "vision_model.* and visual_projection.* have requires_grad False and are not given "
                     "to the optimizer or to clip_grad_norm_; the vision tower still runs (train mode, "
                     "dropout 0)",
}

# ----------------------------------------------------------------------------------------------
# Data: 8 synthetic images with captions
# ----------------------------------------------------------------------------------------------

# (width, height, background, caption, drawing function(draw, w, h))
def _circle(col):
    return lambda d, w, h: d.ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=col)


def _square(col):
    return lambda d, w, h: d.rectangle([w * 0.25, h * 0.25, w * 0.75, h * 0.75], fill=col)


def _triangle(col):
    return lambda d, w, h: d.polygon([(w * 0.5, h * 0.1), (w * 0.9, h * 0.9), (w * 0.1, h * 0.9)], fill=col)


def _stripes(col):
    def f(d, w, h):
        d.rectangle([0, h * 0.2, w, h * 0.35], fill=col)
        d.rectangle([0, h * 0.6, w, h * 0.75], fill=col)
    return f


def _cross(col):
    def f(d, w, h):
        d.rectangle([w * 0.4, h * 0.1, w * 0.6, h * 0.9], fill=col)
        d.rectangle([w * 0.1, h * 0.4, w * 0.9, h * 0.6], fill=col)
    return f


def _ring(col):
    return lambda d, w, h: d.ellipse([w * 0.15, h * 0.15, w * 0.85, h * 0.85], outline=col, width=4)


def _star(col):
    def f(d, w, h):
        cx, cy, r1, r2 = w / 2, h / 2, min(w, h) * 0.45, min(w, h) * 0.18
        pts = []
        for k in range(10):
            r = r1 if k % 2 == 0 else r2
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=col)
    return f


def _diagonal(col):
    return lambda d, w, h: d.line([(0, 0), (w - 1, h - 1)], fill=col, width=5)


IMAGES = [
    (32, 32, (255, 255, 255), "a red circle on a white background", _circle((220, 20, 30))),
    (48, 40, (250, 230, 40), "a blue square on a yellow background", _square((20, 40, 200))),
    (40, 32, (0, 0, 0), "a green triangle on a black background", _triangle((30, 200, 60))),
    (36, 36, (110, 40, 150), "two orange stripes on a purple background", _stripes((250, 140, 20))),
    (32, 40, (200, 20, 20), "a white cross on a red background", _cross((255, 255, 255))),
    (45, 33, (200, 200, 200), "a black ring on a light grey background", _ring((0, 0, 0))),
    (48, 32, (10, 20, 90), "a yellow star on a dark blue background", _star((255, 220, 0))),
    (37, 39, (40, 140, 60), "a pink diagonal line on a green background", _diagonal((255, 120, 180))),
]


def make_images(out: Path) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, (w, h, bg, caption, draw) in enumerate(IMAGES):
        im = Image.new("RGB", (w, h), bg)
        draw(ImageDraw.Draw(im), w, h)
        # a faint deterministic gradient so that no image is piecewise constant
        a = np.asarray(im, dtype=np.int16)
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.clip(a + ((xx + 2 * yy + 7 * i) % 9 - 4)[..., None], 0, 255).astype(np.uint8)
        name = f"images/{i:02d}.png"
        Image.fromarray(a, "RGB").save(out / name, optimize=False)
        pairs.append({"image": name, "caption": caption})
    return pairs


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


log, fmt, maxdiff = fixture_common.log, fixture_common.fmt, fixture_common.maxdiff


def versions() -> dict:
    return fixture_common.versions(["torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy"])


def write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine_lr (training/scheduler.py), for the step about to be taken."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, total - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def load_model():
    from transformers import CLIPModel

    model, info = CLIPModel.from_pretrained(str(MODEL_DIR), output_loading_info=True)
    assert not any(v for v in info.values()), info
    return model.train()


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


# ----------------------------------------------------------------------------------------------
# The reference trainer
# ----------------------------------------------------------------------------------------------


def train(pixels: torch.Tensor, captions: list[str], tok, *, batch_size=4, accum=1, freeze_vision=False,
          variant: str | None = None, record_step0_grads=False, dtype=torch.float32):
    """Run RECIPE's 4 optimizer steps from the base model. `variant` applies one deliberate mistake
    (for the sensitivity checks only). Returns (model, record dict)."""
    r = RECIPE
    model = load_model().to(dtype)
    pixels = pixels.to(dtype)
    named = list(model.named_parameters())
    if freeze_vision:
        for n, p in named:
            if is_vision(n):
                p.requires_grad_(False)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    wd = r["weight_decay"]
    if variant == "weight decay on every parameter":
        groups = [{"params": [p for _, p in trainable], "weight_decay": wd}]
    else:
        groups = [{"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    eps = 1e-6 if variant == "eps 1e-6" else r["eps"]
    if variant == "Adam with L2 (torch.optim.Adam weight_decay) instead of AdamW":
        opt = torch.optim.Adam(groups, lr=r["lr"], betas=tuple(r["betas"]), eps=eps, foreach=False)
    else:
        opt = torch.optim.AdamW(groups, lr=r["lr"], betas=tuple(r["betas"]), eps=eps, foreach=False)

    order = list(range(len(captions))) * r["epochs"]
    per_step = batch_size * accum
    n_steps = len(order) // per_step
    assert n_steps == r["optimizer_steps"] == r["total_steps"], n_steps
    rec = {"losses": [], "lrs": [], "grad_norms": [], "logit_scale_after": [], "micro_losses": [],
           "clamp_active": []}
    for s in range(n_steps):
        lr = lr_at(s, r["lr"], r["warmup_steps"], r["total_steps"])
        if variant == "warmup off by one (lr * s / warmup)":
            lr = r["lr"] * s / r["warmup_steps"] if s < r["warmup_steps"] else lr
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        idx = order[s * per_step:(s + 1) * per_step]
        micro = []
        for k in range(accum):
            mb = idx[k * batch_size:(k + 1) * batch_size]
            t = tok([captions[i] for i in mb], padding=True, return_tensors="pt")
            if variant == "no attention_mask on padded text":
                t["attention_mask"] = torch.ones_like(t["attention_mask"])
            out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels[mb],
                        return_loss=True)
            loss = out.loss
            (loss / accum if accum > 1 else loss).backward()
            micro.append(loss.detach())
        step_loss = micro[0] if accum == 1 else torch.stack(micro).mean()
        if record_step0_grads and s == 0:
            rec["step0_grads"] = {n: p.grad.detach().clone() for n, p in trainable}
            step0_text = tok([captions[i] for i in idx], padding=True)["input_ids"]
            rec["step0_ids"] = sorted({int(x) for row in step0_text for x in row})
        params = [p for _, p in trainable]
        if variant == "no gradient clipping":
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"], foreach=False)
        opt.step()
        with torch.no_grad():
            before = model.logit_scale.item()
            if variant != "no logit_scale clamp":
                model.logit_scale.clamp_(*r["logit_scale_clamp"])
            rec["clamp_active"].append(model.logit_scale.item() != before)
        rec["losses"].append(step_loss)
        rec["micro_losses"].append([m.item() for m in micro])
        rec["lrs"].append(lr)
        rec["grad_norms"].append(norm.detach())
        rec["logit_scale_after"].append(model.logit_scale.detach().clone())
    rec["losses"] = torch.stack(rec["losses"])
    rec["grad_norms"] = torch.stack(rec["grad_norms"])
    rec["logit_scale_after"] = torch.stack(rec["logit_scale_after"])
    rec["lrs_t"] = torch.tensor(rec["lrs"], dtype=torch.float64)
    return model, rec


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def generate(out: Path):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPTokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    log(f"writing {out}")
    pairs = make_images(out)
    write_json(out / "pairs.json", pairs)
    captions = [p["caption"] for p in pairs]

    tok = CLIPTokenizer.from_pretrained(str(MODEL_DIR))
    proc = CLIPImageProcessorPil.from_pretrained(str(MODEL_DIR))
    proc_tv = CLIPImageProcessor.from_pretrained(str(MODEL_DIR))
    rgbs = [Image.open(out / p["image"]).convert("RGB") for p in pairs]
    pixels = torch.cat([proc(im, return_tensors="pt")["pixel_values"] for im in rgbs])
    pixels_tv = torch.cat([proc_tv(im, return_tensors="pt")["pixel_values"] for im in rgbs])
    assert pixels.shape == (8, 3, 32, 32) and pixels.dtype == torch.float32
    ids = [tok(c)["input_ids"] for c in captions]
    data_ids = sorted({x for row in ids for x in row})

    base = load_model()
    base_named = {n: p.detach().clone() for n, p in base.named_parameters()}

    log("case: full fine-tune")
    model, rec = train(pixels, captions, tok, record_step0_grads=True)
    log("case: frozen vision")
    fmodel, frec = train(pixels, captions, tok, freeze_vision=True)
    log("case: gradient accumulation")
    amodel, arec = train(pixels, captions, tok, batch_size=2, accum=2)

    tensors: dict[str, torch.Tensor] = {
        "losses": rec["losses"], "lrs": rec["lrs_t"], "grad_norms": rec["grad_norms"],
        "logit_scale_after": rec["logit_scale_after"], "pixels": pixels,
    }
    step0_ids = rec["step0_ids"]
    for n, g in rec["step0_grads"].items():
        if n == TOKEN_EMB:
            tensors[f"grad_rows.{n}"] = g[step0_ids]
            tensors["grad_rows_ids"] = torch.tensor(step0_ids, dtype=torch.int64)
            nonzero_rows = sorted(int(i) for i in (g.abs().sum(1) > 0).nonzero().flatten())
            assert set(nonzero_rows) <= set(step0_ids), "token-embedding grad outside the batch's ids"
        else:
            tensors[f"grad.{n}"] = g
    unused_ids = [0, 320 + 1000, 49405]
    assert not set(unused_ids) & set(data_ids)
    for n, p in model.named_parameters():
        if n == TOKEN_EMB:
            tensors[f"after_rows.{n}"] = p.detach()[data_ids]
            tensors["after_rows_ids"] = torch.tensor(data_ids, dtype=torch.int64)
            tensors[f"after_rows_unused.{n}"] = p.detach()[unused_ids]
            tensors["after_rows_unused_ids"] = torch.tensor(unused_ids, dtype=torch.int64)
        else:
            tensors[f"after.{n}"] = p.detach()
    tensors["frozen_vision.losses"] = frec["losses"]
    tensors["frozen_vision.grad_norms"] = frec["grad_norms"]
    tensors["frozen_vision.after.text_projection.weight"] = fmodel.text_projection.weight.detach()
    tensors["frozen_vision.after.logit_scale"] = fmodel.logit_scale.detach()
    tensors["accum.losses"] = arec["losses"]
    tensors["accum.grad_norms"] = arec["grad_norms"]
    tensors["accum.after.visual_projection.weight"] = amodel.visual_projection.weight.detach()

    # ---- checks ----
    checks = {}
    # the loss is the formula in ARITHMETIC["loss"]
    m0 = load_model()
    t = tok(captions[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        o = m0(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels[:4],
               return_loss=True)
        img = m0.get_image_features(pixel_values=pixels[:4]).pooler_output
        txt = m0.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        lpt = txt @ img.T * m0.logit_scale.exp()
        ar = torch.arange(4)
        manual = (torch.nn.functional.cross_entropy(lpt, ar) + torch.nn.functional.cross_entropy(lpt.T, ar)) / 2
        # one caption at a time, unpadded, must give the same text features (padding is inert)
        one = torch.cat([m0.get_text_features(input_ids=torch.tensor([ids[i]])).pooler_output for i in range(4)])
        one = one / one.norm(dim=-1, keepdim=True)
    checks["loss_formula"] = {
        "note": "step 0's loss from CLIPModel(return_loss=True) vs the formula with torch.norm and "
                "F.cross_entropy; text features of the padded batch vs each caption alone",
        "hf_loss": o.loss.item(), "manual_loss": manual.item(), "abs_diff": fmt(abs(o.loss.item() - manual.item())),
        "padded_vs_unpadded_text_features_max_abs_diff": maxdiff(txt, one),
        "equals_recorded_step0_loss": bool(o.loss.item() == rec["losses"][0].item()),
    }
    # unused token-embedding rows only decay
    decay = 1.0
    for lr in rec["lrs"]:
        decay *= 1 - lr * RECIPE["weight_decay"]
    emb_after = dict(model.named_parameters())[TOKEN_EMB].detach()
    checks["unused_token_rows"] = {
        "note": "rows of the token embedding that no caption uses get zero gradient, so AdamW only "
                "decays them: after = before * prod_s(1 - lr_s * 0.2) (each step rounds in float32)",
        "decay_factor": decay,
        "max_abs_diff_vs_before_times_factor": maxdiff(emb_after[unused_ids], base_named[TOKEN_EMB][unused_ids] * decay),
        "rows_changed_total": int((emb_after != base_named[TOKEN_EMB]).any(1).sum()),
        "rows_in_vocab": int(emb_after.shape[0]),
    }
    checks["logit_scale"] = {
        "before": base_named["logit_scale"].item(),
        "after_each_step": [x.item() for x in rec["logit_scale_after"]],
        "clamp_changed_it": rec["clamp_active"],
        "note": "transformers 5 never clamps logit_scale (CLIPModel.forward only exp()s it); the clamp "
                "is open_clip's and is a no-op at this scale",
    }
    checks["grad_clipping_active"] = {
        "full": [bool(x > RECIPE["max_grad_norm"]) for x in rec["grad_norms"]],
        "frozen_vision": [bool(x > RECIPE["max_grad_norm"]) for x in frec["grad_norms"]],
        "accum": [bool(x > RECIPE["max_grad_norm"]) for x in arec["grad_norms"]],
    }
    checks["torchvision_backend_vs_pil_backend_pixels_max_abs_diff"] = {
        "note": "pixels use CLIPImageProcessorPil (the PIL path; Rust preprocessing matches it). transformers "
                "5's CLIPImageProcessor is the torchvision backend and differs by this much:",
        "max_abs_diff": maxdiff(pixels, pixels_tv),
    }
    frozen_unchanged = all(torch.equal(p, base_named[n]) for n, p in fmodel.named_parameters() if is_vision(n))
    checks["frozen_vision_tower_unchanged"] = frozen_unchanged
    assert frozen_unchanged

    # sensitivity: how far the results move under plausible mistakes
    log("sensitivity")
    sens = {}
    after_ref = {n: p.detach() for n, p in model.named_parameters()}
    for variant in ["weight decay on every parameter", "no gradient clipping",
                    "warmup off by one (lr * s / warmup)", "Adam with L2 (torch.optim.Adam weight_decay) instead of AdamW",
                    "eps 1e-6"]:
        vm, vr = train(pixels, captions, tok, variant=variant)
        vp = dict(vm.named_parameters())
        worst = max(((maxdiff(vp[n].detach(), a), n) for n, a in after_ref.items()
                     if not n.endswith("self_attn.k_proj.bias")), key=lambda x: x[0])
        sens[variant] = {"losses_max_abs_diff": maxdiff(vr["losses"], rec["losses"]),
                         "after_params_max_abs_diff": worst[0], "worst_param": worst[1]}
    vm, vr = train(pixels, captions, tok, variant="no attention_mask on padded text")
    checks["attention_mask_irrelevant"] = {
        "note": "the full case rerun with attention_mask all ones (pads attended as keys): bit-identical, "
                "because pads only follow the pooled eos and the text tower is causal",
        "bit_identical": bool(torch.equal(vr["losses"], rec["losses"]) and all(
            torch.equal(a, after_ref[n]) for n, a in vm.named_parameters())),
    }

    # float32 noise floor: the full case in float64, compared with the float32 reference
    log("float64 rerun")
    dm, dr = train(pixels, captions, tok, record_step0_grads=True, dtype=torch.float64)
    dp = dict(dm.named_parameters())
    # attention's key bias adds the same q.b_k to every score of a query row, which softmax ignores:
    # its gradient is exactly 0 in exact arithmetic, float32 noise in practice, and Adam (which divides
    # by sqrt(v) + eps) turns that noise into steps of up to ~lr. Those parameters are listed apart.
    zero_grad = [n for n, g in dr["step0_grads"].items() if g.abs().max().item() < 1e-12]
    assert zero_grad and all(n.endswith("self_attn.k_proj.bias") for n in zero_grad), zero_grad
    rest = [n for n in rec["step0_grads"] if n not in zero_grad]
    grad_diff = max((maxdiff(rec["step0_grads"][n], dr["step0_grads"][n]), n) for n in rest)
    grad_rel = max(fmt(((rec["step0_grads"][n].double() - dr["step0_grads"][n]).norm()
                        / dr["step0_grads"][n].norm()).item()) for n in rest)
    after_diff = max((maxdiff(after_ref[n], dp[n].detach()), n) for n in rest)
    checks["float64_rerun"] = {
        "note": "the full case recomputed in float64 (same recipe) vs the float32 reference: the noise floor "
                "a float32 re-implementation can expect. zero_gradient_params (every self_attn.k_proj.bias) "
                "have a gradient that is mathematically 0 (softmax is shift-invariant) and are excluded from "
                "the *_max_* numbers: their stored grads are float32 noise and their after values include "
                "noise-driven Adam steps of up to ~lr each; they do not affect the forward pass at all",
        "zero_gradient_params": zero_grad,
        "zero_gradient_params_float32_grad_max_abs": fmt(max(rec["step0_grads"][n].abs().max().item() for n in zero_grad)),
        "zero_gradient_params_after_max_abs_diff": fmt(max(maxdiff(after_ref[n], dp[n].detach()) for n in zero_grad)),
        "zero_gradient_params_after_max_abs_change_from_base": fmt(max(maxdiff(after_ref[n], base_named[n]) for n in zero_grad)),
        "losses_max_abs_diff": maxdiff(rec["losses"], dr["losses"]),
        "grad_norms_max_abs_diff": maxdiff(rec["grad_norms"], dr["grad_norms"]),
        "step0_grads_max_abs_diff": grad_diff[0], "step0_grads_worst_param": grad_diff[1],
        "step0_grads_max_relative_l2_diff": grad_rel,
        "after_params_max_abs_diff": after_diff[0], "after_params_worst_param": after_diff[1],
        "logit_scale_after_max_abs_diff": maxdiff(rec["logit_scale_after"], dr["logit_scale_after"]),
    }

    checks["sensitivity"] = {
        "note": "max abs change vs the reference (full case) under deliberate mistakes (not stored; "
                "k_proj.bias excluded): test tolerances must sit well below these",
        "variants": sens,
    }

    tensors = {k: v.detach().contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(out / "reference.safetensors"), metadata={"generator": "scripts/make_train_fixtures.py"})

    names = [(n, p) for n, p in base.named_parameters()]
    meta = {
        "generator": "scripts/make_train_fixtures.py",
        "command": COMMAND,
        "versions": versions(),
        "base_model": str(MODEL_DIR.relative_to(REPO)),
        "recipe": RECIPE,
        "arithmetic": ARITHMETIC,
        "cases": {
            "full": {"batch_size": 4, "accumulation_steps": 1, "freeze_vision": False, "tensor_prefix": ""},
            "frozen_vision": {"batch_size": 4, "accumulation_steps": 1, "freeze_vision": True,
                              "tensor_prefix": "frozen_vision."},
            "accum": {"batch_size": 2, "accumulation_steps": 2, "freeze_vision": False, "tensor_prefix": "accum."},
        },
        "steps": [{"step": s, "pairs": [(4 * s + k) % 8 for k in range(4)]} for s in range(4)],
        "captions": [{"index": i, "image": pairs[i]["image"], "caption": c, "ids": ids[i]}
                     for i, c in enumerate(captions)],
        "images": [{"image": p["image"], "width": IMAGES[i][0], "height": IMAGES[i][1]} for i, p in enumerate(pairs)],
        "losses": [x.item() for x in rec["losses"]],
        "lrs": rec["lrs"],
        "grad_norms": [x.item() for x in rec["grad_norms"]],
        "frozen_vision": {"losses": [x.item() for x in frec["losses"]],
                          "grad_norms": [x.item() for x in frec["grad_norms"]]},
        "accum": {"losses": [x.item() for x in arec["losses"]], "micro_losses": arec["micro_losses"],
                  "grad_norms": [x.item() for x in arec["grad_norms"]]},
        "num_parameters": sum(p.numel() for _, p in names),
        "parameters": [{"name": n, "shape": list(p.shape), "group": "decay" if p.ndim >= 2 else "no_decay",
                        "vision": is_vision(n)} for n, p in names],
        "zero_gradient_params": checks["float64_rerun"]["zero_gradient_params"],
        "step0_token_ids": step0_ids,
        "data_token_ids": data_ids,
        "unused_token_ids": unused_ids,
        "checks": checks,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
    }
    write_json(out / "reference.json", meta)
    write_readme(out, meta)
    return meta


def write_readme(out: Path, meta: dict):
    v = meta["versions"]
    n_dec = sum(p["group"] == "decay" for p in meta["parameters"])
    lines = [
        "# CLIP fine-tuning test fixtures",
        "",
        "Generated by `scripts/make_train_fixtures.py`; do not edit by hand. From the repository root:",
        "",
        "```",
        COMMAND + "            # (re)write this folder",
        COMMAND + " --verify   # regenerate elsewhere, compare byte for byte",
        "```",
        "",
        "Versions used: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Base model: `{meta['base_model']}` (random weights, made by `scripts/make_clip_fixtures.py`).",
        "The reference trainer is plain torch (no HF Trainer), CPU, float32, one thread.",
        "",
        "## Files",
        "",
        "- `images/00.png` .. `07.png`: synthetic RGB PNGs (coloured shapes plus a faint gradient), sizes",
        "  " + ", ".join(f"{im['width']}x{im['height']}" for im in meta["images"]) + "; all but 32x32 need",
        "  resize and/or centre crop to 32x32.",
        "- `pairs.json`: `[{\"image\": \"images/00.png\", \"caption\": \"...\"}, ...]`, in training order.",
        "- `reference.safetensors`: the tensors below.",
        "- `reference.json`: versions, `recipe` and `arithmetic` (the exact update rules), `captions` with",
        "  their token ids (bos/eos, no padding), `steps` (pairs per step), `losses`, `lrs`, `grad_norms`,",
        "  the same for `frozen_vision` and `accum`, `parameters` (name, shape, group decay/no_decay, in",
        "  `named_parameters()` order), token id lists, `checks` and `tensors` (name -> dtype, shape).",
        "",
        "## Recipe",
        "",
        "8 pairs, batch 4, 2 epochs in order (no shuffle) -> 4 optimizer steps: pairs 0-3, 4-7, 0-3, 4-7.",
        "Loss = `CLIPModel(..., return_loss=True).loss` (symmetric cross-entropy over",
        "`exp(logit_scale) * norm(text) @ norm(image).T`). Text: tokenizer with `padding=True` (pad",
        "49407 to the longest caption of the micro-batch) and its attention mask. All parameters",
        "trainable; `clip_grad_norm_(params, 1.0)`; AdamW(lr, betas (0.9, 0.999), eps 1e-8,",
        f"`foreach=False`), weight decay 0.2 on the {n_dec} tensors with ndim >= 2, 0 on the",
        f"{len(meta['parameters']) - n_dec} others (biases, layer norms, `class_embedding`, `logit_scale`);",
        "lr from open_clip's `cosine_lr`: base 1e-3, warmup 2, total 4 ->",
        "`" + ", ".join(f"{x:.6g}" for x in meta["lrs"]) + "`;",
        "after each step `logit_scale.clamp_(0, ln 100)`. reference.json's `arithmetic` spells out",
        "clipping and AdamW as torch computes them.",
        "",
        "Cases: **full** (the above), **frozen_vision** (`vision_model.*`, `visual_projection.*` frozen and",
        "not in the optimizer), **accum** (batch 2, 2 micro-batches per optimizer step, each micro-batch",
        "loss / 2 before backward, negatives only within the micro-batch, step loss = mean of the two).",
        "",
        "Losses (full): `" + ", ".join(f"{x:.6f}" for x in meta["losses"]) + "`; frozen_vision: `"
        + ", ".join(f"{x:.6f}" for x in meta["frozen_vision"]["losses"]) + "`; accum: `"
        + ", ".join(f"{x:.6f}" for x in meta["accum"]["losses"]) + "`.",
        "",
        "## reference.safetensors",
        "",
        "| tensor | dtype, shape | what |",
        "|---|---|---|",
        "| `losses` | f32 [4] | loss of each step, before its update |",
        "| `lrs` | f64 [4] | lr of each step |",
        "| `grad_norms` | f32 [4] | global L2 grad norm before clipping |",
        "| `logit_scale_after` | f32 [4] | logit_scale after each step's update and clamp |",
        "| `pixels` | f32 [8, 3, 32, 32] | CLIPImageProcessorPil of `Image.open(img).convert('RGB')` |",
        "| `grad.NAME` | f32, param shape | gradient at step 0, before clipping, every parameter but the token embedding |",
        "| `grad_rows.text_model.embeddings.token_embedding.weight` | f32 [n, 16] | its step-0 gradient rows for `grad_rows_ids` |",
        "| `grad_rows_ids` | i64 [n] | the token ids of step 0's batch, ascending (every other row's gradient is 0) |",
        "| `after.NAME` | f32, param shape | every parameter but the token embedding after the 4 steps |",
        "| `after_rows.text_model.embeddings.token_embedding.weight` | f32 [m, 16] | rows `after_rows_ids` after the 4 steps |",
        "| `after_rows_ids` | i64 [m] | every token id in the captions, ascending |",
        "| `after_rows_unused.text_model.embeddings.token_embedding.weight` | f32 [3, 16] | rows of ids no caption uses, after 4 steps (weight decay only) |",
        "| `after_rows_unused_ids` | i64 [3] | those ids |",
        "| `frozen_vision.losses`, `frozen_vision.grad_norms` | f32 [4] | frozen-vision case |",
        "| `frozen_vision.after.text_projection.weight`, `frozen_vision.after.logit_scale` | f32 | its final values |",
        "| `accum.losses`, `accum.grad_norms` | f32 [4] | accumulation case (loss = mean of micro-batch losses; norm of the summed grads) |",
        "| `accum.after.visual_projection.weight` | f32 [12, 20] | its final value |",
        "",
        "**Tolerances.** `checks.float64_rerun` compares the float32 reference with the same run in",
        "float64: losses within ~1e-6, step-0 gradients ~1.5e-6 (relative L2 ~2e-6), weights after 4",
        "steps ~3e-7 -- EXCEPT the four `*.self_attn.k_proj.bias` (listed in `zero_gradient_params`).",
        "Their gradient is mathematically zero (adding the same q.b_k to a row of scores does not",
        "change the softmax) and they do not affect the forward pass; the stored `grad.*k_proj.bias`",
        "are float32 noise (|g| < 1e-7) and Adam turns that noise into steps comparable to the lr, so",
        "`after.*k_proj.bias` (moved up to ~3e-4 from the base) cannot be matched: compare their grads",
        "with an absolute tolerance and skip their after values (or only bound |after - base| by",
        "sum(lrs)).",
        "",
        "Gradient clipping is active at every step (norms above 1) in all three cases (`checks`).",
        "`checks.sensitivity` gives how far the losses and weights move under plausible mistakes (no",
        "weight-decay split, no clipping, warmup off by one, Adam-L2 instead of AdamW, eps 1e-6, no",
        "attention mask), so that test tolerances can be set well below them.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main():
    fixture_common.run(__doc__.split("\n")[0], DEFAULT_OUT, generate, lambda meta: print(json.dumps(
        {k: meta[k] for k in ["losses", "lrs", "grad_norms", "frozen_vision", "accum", "num_parameters"]},
        indent=1)))



if __name__ == "__main__":
    main()
