#!/usr/bin/env python3
"""Generate the CLIP test fixtures in tests/fixtures/clip/ (developer-run; the output is committed).

Command (from the repository root), in a virtual environment holding the reference stack:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.15.0 transformers==5.24.0 sentence-transformers==6.2.0 \
        safetensors==0.8.0 tokenizers==0.23.3 pillow==13.0.0 numpy==2.4.6 open-clip-torch==3.3.0 \
        scikit-image==0.26.0
    /tmp/refvenv/bin/python scripts/make_clip_fixtures.py            # (re)write tests/fixtures/clip/
    /tmp/refvenv/bin/python scripts/make_clip_fixtures.py --verify   # regenerate into a temporary
                                                                     # folder, compare byte for byte

Nothing is downloaded: every model is a random-weight CLIPModel built from a config with fixed seeds,
the tokenizer is built from open_clip's bpe_simple_vocab_16e6.txt.gz (inside the open-clip-torch
wheel) the way transformers' slow->fast conversion builds it, and the "real photos" are
scikit-image's bundled sample images (skimage.data). Everything runs on the CPU in float32 with one
thread, so a rerun with the same versions writes byte-identical files (`--verify` checks that).

Output (see tests/fixtures/clip/README.md, written by this script, for the details):
    images/                  test images: 4 real photos at several sizes, plus odd encodings
    models/tiny-quickgelu/   safetensors, tokenizer.json, preprocessor_config.json
    models/tiny-gelu/        pytorch_model.bin only (no tokenizer, no preprocessor config)
    models/tiny-sharded/     2 safetensors shards + index, vocab.json/merges.txt, preprocessor config
    models/tiny-st/          sentence-transformers layout: modules.json -> 0_CLIPModel/
    references.safetensors   token-free reference tensors (features, pixels, decoded images)
    references.json          versions, configs, texts and their ids, images, tensor list, checks
"""

from __future__ import annotations

import binascii
import gzip
import io
import json
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

import fixture_common  # scripts/fixture_common.py (scripts/ is on sys.path when run as a script)
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "clip"
COMMAND = "/tmp/refvenv/bin/python scripts/make_clip_fixtures.py"

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LEN = 77

# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------

LONG_TEXT = (
    "A long caption that goes on well past the seventy-seven token context of CLIP's text tower: "
    "an astronaut in a white spacesuit stands beside an American flag on a grey, dusty plain, while "
    "a tabby cat naps on a sunlit windowsill, a cup of coffee cools on a wooden table, a rocket waits "
    "on its launch pad under a pale blue sky, and the photographer, who has been awake since dawn, "
    "wonders whether anyone will ever read this far into the sentence, because the tokenizer will "
    "certainly have cut it off long before the end."
)

TEXTS = [
    "a photo of a cat",
    "An astronaut in a white spacesuit stands in front of an American flag.",
    LONG_TEXT,
    "",
    # accents, one of them decomposed (e + U+0301): the tokenizer's NFC normalizer must compose it
    "Crème brûlée à la française, naïve cafe\u0301 in Zürich",
    # emoji: plain, ZWJ sequence, skin-tone modifier, regional-indicator flag
    "I love \U0001F355 and \U0001F408\u200D\u2B1B!! \U0001F44D\U0001F3FD \U0001F1EF\U0001F1F5",
    "  MIXED Case\tTabs\nnewlines   and    runs of spaces  ",
    "It's 3.14159 \u2014 don't panic! (42%) \u6771\u4eac\u306e\u732b #hashtag @user",
]

# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

MODELS = {
    "tiny-quickgelu": dict(
        seed=1001,
        text=dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5),
        vision=dict(hidden_size=20, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        projection_dim=12,
        logit_scale=math.log(1 / 0.07),
        weights="safetensors",
        tokenizer="tokenizer.json",
        preprocess=dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ),
    "tiny-gelu": dict(
        seed=2002,
        text=dict(hidden_size=20, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", layer_norm_eps=1e-6),
        vision=dict(hidden_size=24, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                    image_size=48, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=8,
        logit_scale=3.0,
        weights="bin",
        tokenizer=None,
        # Not saved: the consumer must fall back to the standard preprocessing at image_size.
        preprocess=dict(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
    ),
    "tiny-sharded": dict(
        seed=3003,
        text=dict(hidden_size=18, intermediate_size=36, num_hidden_layers=2, num_attention_heads=3,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5),
        vision=dict(hidden_size=28, intermediate_size=60, num_hidden_layers=3, num_attention_heads=7,
                    image_size=40, patch_size=10, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        projection_dim=10,
        logit_scale=math.log(100.0),
        weights="sharded",
        tokenizer="slow",
        # Resize larger than the crop, and non-OpenAI mean/std: both must come from the file.
        preprocess=dict(size={"shortest_edge": 44}, crop_size={"height": 40, "width": 40},
                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    ),
}
ST_NAME = "tiny-st"
ST_SOURCE = "tiny-quickgelu"  # tiny-st holds the same weights, saved in the sentence-transformers layout
MODEL_ORDER = ["tiny-quickgelu", "tiny-gelu", "tiny-sharded", ST_NAME]
SHARD_SIZE = "1MB"

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


log, fmt, maxdiff = fixture_common.log, fixture_common.fmt, fixture_common.maxdiff


def versions() -> dict:
    return fixture_common.versions(["torch", "transformers", "tokenizers", "safetensors", "sentence-transformers",
                 "pillow", "numpy", "open-clip-torch", "scikit-image"])


# ----------------------------------------------------------------------------------------------
# Tokenizer (built as transformers' CLIPConverter builds it from the slow vocab/merges)
# ----------------------------------------------------------------------------------------------


def clip_vocab_and_merges():
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1: 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE and len(set(vocab)) == VOCAB_SIZE
    return {t: i for i, t in enumerate(vocab)}, merges


def build_tokenizer(vocab, merges):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok


SLOW_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": MAX_LEN,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
SPECIAL_TOKENS_MAP = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def save_slow_tokenizer(d: Path, vocab, merges):
    """vocab.json + merges.txt (+ configs), the files of transformers' slow CLIPTokenizer."""
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")),
                                  encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                  encoding="utf-8")
    write_json(d / "tokenizer_config.json", SLOW_TOKENIZER_CONFIG)
    write_json(d / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def save_fast_tokenizer(d: Path, tok):
    tok.save_pretrained(str(d))
    # Same JSON, written compactly (as on the hub) rather than pretty-printed: 1.7 MB, not 3.6 MB
    tj = d / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text(encoding="utf-8")), ensure_ascii=False,
                             separators=(",", ":")), encoding="utf-8")
    # transformers 5 writes only tokenizer.json + tokenizer_config.json; add the classic map too
    write_json(d / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    return Image.fromarray(a)


def fit(im: Image.Image, w: int, h: int) -> Image.Image:
    return ImageOps.fit(im, (w, h), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def make_images(d: Path) -> list[dict]:
    d.mkdir(parents=True, exist_ok=True)
    out = []

    def add(name, im_or_writer, kind, source, notes, **save):
        path = d / name
        if callable(im_or_writer):
            im_or_writer(path)
        else:
            im_or_writer.save(path, **save)
        size = path.stat().st_size
        assert size < 60_000, f"{name} is {size} bytes"
        with Image.open(path) as r:
            info = dict(name=name, kind=kind, source=source, format=r.format, pil_mode=r.mode,
                        width=r.width, height=r.height, n_frames=getattr(r, "n_frames", 1),
                        bytes=size, notes=notes)
        out.append(info)

    astronaut, chelsea = skimage_photo("astronaut"), skimage_photo("chelsea")
    coffee, rocket, camera = skimage_photo("coffee"), skimage_photo("rocket"), skimage_photo("camera")

    # --- real photos (these also get processor224/ references) ---
    add("photo_astronaut_300x200_q90.jpg", fit(astronaut, 300, 200), "photo", "skimage.data.astronaut",
        "landscape 3:2 JPEG, quality 90, 4:2:0 chroma subsampling", quality=90)
    add("photo_rocket_180x240.png", fit(rocket, 180, 240), "photo", "skimage.data.rocket",
        "portrait 3:4 RGB PNG", optimize=False)
    add("photo_coffee_640x480_q80.jpg", fit(coffee, 640, 480), "photo", "skimage.data.coffee",
        "landscape 4:3 JPEG, quality 80 (upscaled from 600x400 to 640x480 before saving)", quality=80)
    add("photo_chelsea_97x131_q90.jpg", fit(chelsea, 97, 131), "photo", "skimage.data.chelsea",
        "odd-sized portrait JPEG (width and height odd), quality 90", quality=90)

    # --- edge-case encodings ---
    add("gray_L_camera_120x90.png", fit(camera, 120, 90), "edge", "skimage.data.camera",
        "8-bit grayscale PNG (mode L): convert('RGB') copies the gray value into R, G and B")

    rgba = fit(chelsea, 100, 75).convert("RGBA")
    alpha = np.full((75, 100), 255, np.uint8)
    alpha[:, :34] = 0      # fully transparent left third (colour data kept underneath)
    alpha[:, 34:67] = 128  # half transparent middle third
    rgba.putalpha(Image.fromarray(alpha))
    add("rgba_transparent_chelsea_100x75.png", rgba, "edge", "skimage.data.chelsea",
        "RGBA PNG: left third alpha 0 (the photo's colours are still stored under it), middle third "
        "alpha 128, right third opaque. PIL's convert('RGB') drops alpha without compositing, so the "
        "reference sees the stored colours everywhere (no white or black background)")

    pal = fit(coffee, 96, 64).quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    add("palette_P_coffee_96x64.png", pal, "edge", "skimage.data.coffee",
        "palette PNG (mode P, 64 colours, no transparency)")

    g16 = (np.asarray(fit(camera, 80, 100), dtype=np.uint16) * 257).astype(np.uint16)
    add("gray16_I16_camera_80x100.png", Image.fromarray(g16), "edge", "skimage.data.camera",
        "16-bit grayscale PNG (opens as mode I;16), values v8*257 spanning 0..65535. SURPRISE: "
        "Pillow's convert('RGB') CLIPS 16-bit values to 0..255 instead of scaling them, so the "
        "reference image is 0 where the 8-bit source was 0 and 255 everywhere else (near-white). A "
        "decoder that scales 16->8 bits (v/257, as the image crate's to_rgb8 does) will differ")

    def write_cmyk(path):
        fit(astronaut, 96, 96).convert("CMYK").save(path, quality=90)
    add("cmyk_astronaut_96x96_q90.jpg", write_cmyk, "edge", "skimage.data.astronaut",
        "CMYK JPEG written by Pillow (RGB->CMYK as C=255-R, M=255-G, Y=255-B, K=0; Pillow writes an "
        "Adobe APP14 marker and inverted CMYK as Photoshop does); reference = Pillow's "
        "convert('RGB') of the decoded CMYK")

    add("webp_lossy_chelsea_128x96_q90.webp", fit(chelsea, 128, 96), "edge", "skimage.data.chelsea",
        "lossy WebP (VP8), quality 90, method 4", quality=90, method=4, lossless=False)
    add("webp_lossless_coffee_72x96.webp", fit(coffee, 72, 96), "edge", "skimage.data.coffee",
        "lossless WebP (VP8L), portrait", lossless=True, quality=100, method=4)

    base = fit(rocket, 64, 48)
    frames = [base, ImageOps.mirror(base), ImageOps.invert(base)]
    frames = [f.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for f in frames]

    def write_gif(path):
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 100, 100],
                       loop=0, optimize=False, disposal=1)
    add("gif_animated_3frames_rocket_64x48.gif", write_gif, "edge", "skimage.data.rocket",
        "animated GIF, 3 frames (photo, mirrored, inverted), 64-colour palettes; only the FIRST frame "
        "counts (Image.open() is positioned on frame 0)")

    add("bmp_rgb24_astronaut_64x48.bmp", fit(astronaut, 64, 48), "edge", "skimage.data.astronaut",
        "24-bit BMP, bottom-up rows")
    add("tiff_rgb_coffee_80x60.tif", fit(coffee, 80, 60), "edge", "skimage.data.coffee",
        "uncompressed RGB TIFF", compression="raw")
    return out


def load_rgb(path: Path) -> Image.Image:
    """What the references feed the processor: Image.open(path).convert('RGB') (frame 0)."""
    with Image.open(path) as im:
        im.seek(0)
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def make_config(spec):
    from transformers import CLIPConfig

    text = dict(spec["text"], vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_LEN,
                eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=1)
    vision = dict(spec["vision"], num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"],
                      logit_scale_init_value=spec["logit_scale"])


def randomize(model, seed: int, logit_scale: float):
    """Replace every parameter with seeded random values scaled so that every part of the network
    (activations, attention, layer norms, biases) visibly changes the output; transformers' own init
    (std 0.02, unit layer norms, zero biases) leaves much of it near-inert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            def normal(std, mean=0.0):
                return torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean
            if name == "logit_scale":
                p.fill_(logit_scale)
            elif name.endswith("class_embedding") or name.endswith("token_embedding.weight") \
                    or name.endswith("position_embedding.weight"):
                p.copy_(normal(0.5))
            elif any(s in name for s in ("layer_norm", "layernorm", "layrnorm")):
                p.copy_(normal(0.2, 1.0) if name.endswith("weight") else normal(0.1))
            elif name.endswith("weight") and p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(normal(1.0 / math.sqrt(fan_in)))
            elif name.endswith("bias") and p.ndim == 1:
                p.copy_(normal(0.1))
            else:
                raise AssertionError(f"unhandled parameter {name} {tuple(p.shape)}")


def fix_torch_zip(path: Path):
    """torch.save writes a random `.data/serialization_id`; pin it (and its CRC) so reruns are
    byte-identical. The record is stored uncompressed, so patch it in place."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        infos = [i for i in z.infolist() if i.filename.endswith(".data/serialization_id")]
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            old = z.read(info)
            new = b"0" * len(old)
            off = info.header_offset
            n, e = int.from_bytes(data[off + 26: off + 28], "little"), int.from_bytes(data[off + 28: off + 30], "little")
            start = off + 30 + n + e
            assert bytes(data[start: start + len(old)]) == old
            data[start: start + len(old)] = new
            old_crc = info.CRC.to_bytes(4, "little")
            new_crc = (binascii.crc32(new) & 0xFFFFFFFF).to_bytes(4, "little")
            if info.flag_bits & 0x08:
                # torch's writer streams: CRC 0 in the local header, the real one in a data
                # descriptor (PK\7\8, CRC, sizes) right after the data
                end = start + len(old)
                assert bytes(data[end: end + 4]) == b"PK\x07\x08" and bytes(data[end + 4: end + 8]) == old_crc
                data[end + 4: end + 8] = new_crc
            else:
                assert bytes(data[off + 14: off + 18]) == old_crc
                data[off + 14: off + 18] = new_crc
            # central directory record: signature PK\1\2, CRC at +16, name at +46
            name = info.filename.encode()
            cd = 0
            while True:
                cd = bytes(data).find(b"PK\x01\x02", cd)
                assert cd >= 0, "central directory entry not found"
                ln = int.from_bytes(data[cd + 28: cd + 30], "little")
                if bytes(data[cd + 46: cd + 46 + ln]) == name:
                    break
                cd += 4
            assert bytes(data[cd + 16: cd + 20]) == old_crc
            data[cd + 16: cd + 20] = new_crc
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def image_processor(spec_pre: dict):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**spec_pre)


def save_model(name: str, spec: dict, root: Path, vocab, merges, fast_tok):
    from transformers import CLIPModel

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    model = CLIPModel(make_config(spec)).eval()
    randomize(model, spec["seed"], spec["logit_scale"])
    if spec["weights"] == "safetensors":
        model.save_pretrained(str(d))
    elif spec["weights"] == "sharded":
        model.save_pretrained(str(d), max_shard_size=SHARD_SIZE)
    elif spec["weights"] == "bin":
        # transformers 5's save_pretrained(safe_serialization=False) still writes safetensors, so
        # write what transformers 4 wrote: the config plus torch.save(state_dict) as pytorch_model.bin
        model.config.save_pretrained(str(d))
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(sd, d / "pytorch_model.bin")
        fix_torch_zip(d / "pytorch_model.bin")
    else:
        raise ValueError(spec["weights"])
    if spec["tokenizer"] == "tokenizer.json":
        save_fast_tokenizer(d, fast_tok)
    elif spec["tokenizer"] == "slow":
        save_slow_tokenizer(d, vocab, merges)
    if spec["tokenizer"] is not None:
        # preprocessor_config.json, as CLIPImageProcessor.save_pretrained wrote it in transformers 4
        # (transformers 5's CLIPProcessor.save_pretrained nests it in processor_config.json instead)
        image_processor(spec["preprocess"]).save_pretrained(str(d))
    return d


def save_st(root: Path, src: Path) -> Path:
    """The layout sentence-transformers <= 5 wrote for models.CLIPModel (e.g. the hub's
    sentence-transformers/clip-ViT-B-32): modules.json -> 0_CLIPModel/ holding the HF model.
    sentence-transformers 6 no longer writes it (it saves the module in the root with path ""), but
    still loads it; this is verified in run_checks()."""
    d = root / ST_NAME
    inner = d / "0_CLIPModel"
    inner.mkdir(parents=True, exist_ok=True)
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"]:
        shutil.copyfile(src / f, inner / f)
    vocab, merges = clip_vocab_and_merges()
    save_slow_tokenizer(inner, vocab, merges)
    write_json(d / "modules.json", [
        {"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}
    ])
    v = versions()
    write_json(d / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": v["sentence-transformers"],
                        "transformers": v["transformers"], "pytorch": v["torch"]},
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
    })
    return d


def hf_dir(root: Path, name: str) -> Path:
    return root / name / "0_CLIPModel" if name == ST_NAME else root / name


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def text_forward(model, ids: list[int]):
    input_ids = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = model.get_text_features(input_ids=input_ids, attention_mask=mask)
    # transformers 5: get_text_features returns BaseModelOutputWithPooling whose pooler_output is
    # the projected feature (and last_hidden_state the final-layer-normed hidden states)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    with torch.no_grad():
        t = model.text_model(input_ids=input_ids, attention_mask=mask)
    return feats[0], t.pooler_output[0], t.last_hidden_state[0]


def image_forward(model, pixels: torch.Tensor):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
        v = model.vision_model(pixel_values=pixels)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return feats[0], v.pooler_output[0]


def config_summary(cfg, proc, files):
    t, v = cfg.text_config, cfg.vision_config
    keys_t = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "bos_token_id",
              "pad_token_id", "projection_dim"]
    keys_v = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "projection_dim"]
    assert proc.crop_size["height"] == proc.crop_size["width"] and int(proc.resample) == 3
    pre = {
        "do_resize": proc.do_resize, "shortest_edge": proc.size["shortest_edge"], "resample": "bicubic (3)",
        "do_center_crop": proc.do_center_crop, "crop_size": proc.crop_size["height"],
        "do_rescale": proc.do_rescale, "rescale_factor": proc.rescale_factor,
        "do_normalize": proc.do_normalize, "image_mean": list(proc.image_mean),
        "image_std": list(proc.image_std), "do_convert_rgb": proc.do_convert_rgb,
    }
    return {
        "text_config": {k: getattr(t, k) for k in keys_t},
        "vision_config": {k: getattr(v, k) for k in keys_v},
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": cfg.logit_scale_init_value,
        "files": files,
        "preprocess": pre,
    }


def build_references(out: Path, images: list[dict], tokenizers: dict, log_checks: dict):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel

    models_dir = out / "models"
    tensors: dict[str, torch.Tensor] = {}
    texts_json = []
    std_tok = tokenizers["standard"]

    # token ids: identical for every model's tokenizer (checked)
    ids_per_text = []
    for i, text in enumerate(TEXTS):
        ids = std_tok(text, truncation=True, max_length=MAX_LEN)["input_ids"]
        for tname, tok in tokenizers.items():
            assert tok(text, truncation=True, max_length=MAX_LEN)["input_ids"] == ids, (tname, i)
        ids_per_text.append(ids)
        full = std_tok(text)["input_ids"]
        texts_json.append({"index": i, "text": text, "ids": ids, "num_tokens": len(ids),
                           "untruncated_num_tokens": len(full), "truncated": len(full) > len(ids)})

    # decoded RGB (uint8 HWC) of every image, as PIL gives it
    for im in images:
        tensors[f"decoded/{im['name']}"] = torch.from_numpy(np.asarray(load_rgb(out / "images" / im["name"])).copy())

    models_json = {}
    backend_diffs = {}
    for name in MODEL_ORDER:
        d = hf_dir(models_dir, name)
        spec = MODELS[ST_SOURCE if name == ST_NAME else name]
        model, info = CLIPModel.from_pretrained(str(d), output_loading_info=True)
        model.eval()
        problems = {k: sorted(v) for k, v in info.items() if v}
        assert not problems, (name, problems)
        cfg = model.config
        if (d / "preprocessor_config.json").exists():
            proc = CLIPImageProcessorPil.from_pretrained(str(d))
            proc_tv = CLIPImageProcessor.from_pretrained(str(d))
        else:
            s = cfg.vision_config.image_size
            proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
            proc_tv = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        files = sorted(str(p.relative_to(models_dir / name)) for p in (models_dir / name).rglob("*") if p.is_file())

        pooling = []
        for i, ids in enumerate(ids_per_text):
            feats, pooled, hidden = text_forward(model, ids)
            eos_pos = ids.index(cfg.text_config.eos_token_id)
            argmax_pos = int(np.argmax(ids))
            assert torch.equal(pooled, hidden[eos_pos]), (name, i)
            pooling.append({"text": i, "pooled_index": eos_pos, "argmax_index": argmax_pos})
            tensors[f"{name}/text/{i}"] = feats
            tensors[f"{name}/text_pooled/{i}"] = pooled
            tensors[f"{name}/text_hidden/{i}"] = hidden

        diffs = {}
        for im in images:
            rgb = load_rgb(out / "images" / im["name"])
            px = proc(rgb, return_tensors="pt")["pixel_values"]
            feats, pooled = image_forward(model, px)
            tensors[f"{name}/pixels/{im['name']}"] = px[0]
            tensors[f"{name}/image/{im['name']}"] = feats
            tensors[f"{name}/image_pooled/{im['name']}"] = pooled
            px_tv = proc_tv(rgb, return_tensors="pt")["pixel_values"]
            feats_tv, _ = image_forward(model, px_tv)
            diffs[im["name"]] = {"pixels": maxdiff(px, px_tv), "features": maxdiff(feats, feats_tv)}
        backend_diffs[name] = diffs

        models_json[name] = config_summary(cfg, proc, files)
        models_json[name].update({
            "dir": f"models/{name}",
            "hf_dir": str(d.relative_to(out)),
            "seed": spec["seed"],
            "logit_scale": fmt(model.logit_scale.item()),
            "logit_scale_exact": model.logit_scale.item(),
            "preprocessor_config_json": (d / "preprocessor_config.json").exists(),
            "tokenizer_files": ("tokenizer.json" if (d / "tokenizer.json").exists()
                                else "vocab.json+merges.txt" if (d / "vocab.json").exists() else None),
            "weights": ("sharded safetensors" if (d / "model.safetensors.index.json").exists()
                        else "model.safetensors" if (d / "model.safetensors").exists() else "pytorch_model.bin"),
            "texts": [{"index": i, "text": TEXTS[i], "ids": ids, "pooled_index": pooling[i]["pooled_index"]}
                      for i, ids in enumerate(ids_per_text)],
            "pooling": {
                "rule": ("argmax(input_ids) (legacy eos_token_id == 2)" if cfg.text_config.eos_token_id == 2
                         else f"first position where input_ids == eos_token_id ({cfg.text_config.eos_token_id})"),
                "per_text": pooling,
            },
            "num_parameters": sum(p.numel() for p in model.parameters()),
        })
        if name == "tiny-gelu":
            models_json[name]["fallbacks"] = {
                "tokenizer": "none shipped: use the standard CLIP tokenizer (vocab/merges of openai/clip-vit-*, "
                             "bos 49406, eos 49407, model_max_length 77), e.g. built from bpe_simple_vocab_16e6.txt.gz",
                "preprocess": "none shipped: standard CLIPImageProcessor defaults with shortest_edge = crop_size = "
                              "vision_config.image_size (48): bicubic resize of the shortest edge, center crop, "
                              "rescale 1/255, OpenAI mean/std",
            }

    # processor224: ViT-B/32 preprocessing (CLIPImageProcessor defaults) of the real photos
    p224 = CLIPImageProcessorPil()
    p224_tv = CLIPImageProcessor()
    p224_diffs = {}
    for im in images:
        if im["kind"] != "photo":
            continue
        rgb = load_rgb(out / "images" / im["name"])
        px = p224(rgb, return_tensors="pt")["pixel_values"]
        tensors[f"processor224/{im['name']}"] = px[0]
        p224_diffs[im["name"]] = maxdiff(px, p224_tv(rgb, return_tensors="pt")["pixel_values"])
    log_checks["torchvision_backend_vs_pil_backend"] = {
        "note": "transformers 5's CLIPImageProcessor (and AutoImageProcessor's default) is the torchvision "
                "backend; the references use CLIPImageProcessorPil (PIL resize, what transformers 4's "
                "CLIPImageProcessor did). Max abs differences of pixel values and of the resulting features:",
        "models": backend_diffs,
        "processor224_pixels": p224_diffs,
    }
    return tensors, texts_json, models_json


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def run_checks(out: Path, tensors: dict, texts_json: list, images: list[dict], checks: dict):
    from transformers import CLIPImageProcessorPil, CLIPModel

    models_dir = out / "models"
    ids_per_text = [t["ids"] for t in texts_json]

    # 1. determinism: reload from disk and recompute, bit for bit
    det = {}
    for name in MODEL_ORDER:
        d = hf_dir(models_dir, name)
        model = CLIPModel.from_pretrained(str(d)).eval()
        f, _, _ = text_forward(model, ids_per_text[0])
        img = images[0]["name"]
        fi, _ = image_forward(model, tensors[f"{name}/pixels/{img}"][None])
        det[name] = bool(torch.equal(f, tensors[f"{name}/text/0"]) and torch.equal(fi, tensors[f"{name}/image/{img}"]))
        assert det[name], name
    checks["reload_and_recompute_bit_identical"] = det

    # 2. padding: a padded batch (pad id 49407, attention_mask 0 on pads) vs one text at a time
    pad = {}
    legacy = {}
    eager = {}
    for name in MODEL_ORDER:
        d = hf_dir(models_dir, name)
        model = CLIPModel.from_pretrained(str(d)).eval()
        L = max(len(i) for i in ids_per_text)
        batch = torch.tensor([i + [EOS_ID] * (L - len(i)) for i in ids_per_text])
        mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids_per_text])
        ref = torch.stack([tensors[f"{name}/text/{k}"] for k in range(len(TEXTS))])
        with torch.no_grad():
            masked = model.get_text_features(input_ids=batch, attention_mask=mask).pooler_output
            unmasked = model.get_text_features(input_ids=batch).pooler_output
        pad[name] = {"padded_batch_with_mask": maxdiff(masked, ref),
                     "padded_batch_without_mask": maxdiff(unmasked, ref)}
        # 3. legacy configs (eos_token_id == 2) pool at argmax(input_ids): same position here
        model.text_model.eos_token_id = 2
        with torch.no_grad():
            leg = torch.stack([text_forward(model, i)[0] for i in ids_per_text])
        legacy[name] = maxdiff(leg, ref)
        # 4. eager attention vs the default (sdpa)
        me = CLIPModel.from_pretrained(str(d), attn_implementation="eager").eval()
        with torch.no_grad():
            ea = torch.stack([text_forward(me, i)[0] for i in ids_per_text])
            ei = torch.stack([image_forward(me, tensors[f"{name}/pixels/{im['name']}"][None])[0] for im in images])
        ri = torch.stack([tensors[f"{name}/image/{im['name']}"] for im in images])
        eager[name] = {"text": maxdiff(ea, ref), "image": maxdiff(ei, ri),
                       "default_attn_implementation": model.config._attn_implementation}
    checks["padding"] = {
        "note": "max abs difference between get_text_features of all texts as one right-padded batch "
                "(pad = 49407) and the references (one text at a time, no padding). CLIP's text tower is "
                "causal and pools at the first eos, so padding after it cannot change the result",
        "models": pad,
    }
    checks["legacy_eos_token_id_2_argmax_pooling"] = {
        "note": "text features recomputed with text_model.eos_token_id = 2 (argmax pooling): identical "
                "because 49407 is the largest id and argmax returns the first maximum",
        "max_abs_diff": legacy,
    }
    checks["eager_vs_sdpa_attention"] = eager

    # 4b. sensitivity: how far the features move under plausible implementation mistakes, so that
    # tolerances used against these references can be chosen well below them
    sens = {}
    for name in ["tiny-quickgelu", "tiny-gelu", "tiny-sharded"]:
        d = hf_dir(models_dir, name)
        ref_t = torch.stack([tensors[f"{name}/text/{k}"] for k in range(len(TEXTS))])
        ref_i = torch.stack([tensors[f"{name}/image/{im['name']}"] for im in images])
        px = torch.stack([tensors[f"{name}/pixels/{im['name']}"] for im in images])
        row = {}
        for what, edit in [
            ("swap quick_gelu<->gelu", lambda c: [setattr(x, "hidden_act", "gelu" if x.hidden_act == "quick_gelu"
                                                          else "quick_gelu") for x in (c.text_config, c.vision_config)]),
            ("gelu tanh approximation (gelu_new) instead", lambda c: [setattr(x, "hidden_act", "gelu_new")
                                                                      for x in (c.text_config, c.vision_config)]),
            ("layer_norm_eps x10", lambda c: [setattr(x, "layer_norm_eps", x.layer_norm_eps * 10)
                                              for x in (c.text_config, c.vision_config)]),
        ]:
            from transformers import CLIPConfig
            cfg = CLIPConfig.from_pretrained(str(d))
            edit(cfg)
            m = CLIPModel.from_pretrained(str(d), config=cfg).eval()
            with torch.no_grad():
                t = torch.stack([text_forward(m, i)[0] for i in ids_per_text])
                im_ = m.get_image_features(pixel_values=px).pooler_output
            row[what] = {"text": maxdiff(t, ref_t), "image": maxdiff(im_, ref_i)}
        m = CLIPModel.from_pretrained(str(d)).eval()
        with torch.no_grad():
            shifted = px + 1 / 255 / 0.27  # every pixel one 8-bit level brighter
            row["pixels +1 level"] = {"image": maxdiff(m.get_image_features(pixel_values=shifted).pooler_output, ref_i)}
            # pooling at the last position instead of the first eos, for a right-padded batch
            L = max(len(i) for i in ids_per_text)
            batch = torch.tensor([i + [EOS_ID] * (L - len(i)) for i in ids_per_text])
            hid = m.text_model(input_ids=batch).last_hidden_state
            last = m.text_projection(hid[:, -1])
            row["padded batch pooled at last position"] = {"text": maxdiff(last, ref_t)}
        sens[name] = row
    checks["sensitivity"] = {
        "note": "max abs change of the features under deliberate mistakes (not stored anywhere): a test "
                "tolerance must sit well below these to catch them",
        "models": sens,
    }

    # 5. tiny-st holds tiny-quickgelu's weights
    same = all(torch.equal(tensors[f"{ST_NAME}/{k}"], tensors[f"{ST_SOURCE}/{k}"])
               for k in [f"text/{i}" for i in range(len(TEXTS))] + [f"image/{im['name']}" for im in images])
    checks["tiny_st_equals_tiny_quickgelu"] = same

    # 6. sentence-transformers loads tiny-st and its text embedding is get_text_features
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(models_dir / ST_NAME), device="cpu")
    one = []
    for i, text in enumerate(TEXTS):
        e = st.encode([text], convert_to_tensor=True, batch_size=1)[0]
        one.append(maxdiff(e, tensors[f"{ST_NAME}/text/{i}"]))
    batched = st.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    ref = torch.stack([tensors[f"{ST_NAME}/text/{i}"] for i in range(len(TEXTS))])
    st_img = []
    for im in images:
        e = st.encode([load_rgb(out / "images" / im["name"])], convert_to_tensor=True, batch_size=1)[0]
        st_img.append({"image": im["name"], "max_abs_diff": maxdiff(e, tensors[f"{ST_NAME}/image/{im['name']}"])})
    checks["sentence_transformers"] = {
        "loaded_module_types": [type(m).__module__ + "." + type(m).__name__ for m in st],
        "text_one_at_a_time_max_abs_diff": one,
        "text_one_at_a_time_bit_identical": all(x == 0.0 for x in one),
        "text_batched_max_abs_diff": maxdiff(batched, ref),
        "images_max_abs_diff": st_img,
        "note": "SentenceTransformer(models/tiny-st).encode(text) vs CLIPModel.get_text_features(ids) "
                "(stored as tiny-st/text/i). Images go through sentence-transformers' own processor "
                "(transformers 5: the torchvision CLIPImageProcessor), hence tiny image differences",
    }

    # 7. open_clip's tokenizer gives the same ids (without padding; same truncation)
    import open_clip

    oc = open_clip.get_tokenizer("ViT-B-32")
    agree = []
    for t in texts_json:
        row = oc([t["text"]])[0].tolist()
        n = row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        agree.append(row[:n] == t["ids"])
    checks["open_clip_tokenizer_agrees"] = agree

    # 8. the tokenizers library on tokenizer.json alone (what a Rust `tokenizers` consumer does):
    # enable_truncation(77) keeps room for bos/eos, so the ids equal transformers'
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(models_dir / "tiny-quickgelu" / "tokenizer.json"))
    untruncated_long = len(raw.encode(texts_json[2]["text"]).ids)
    raw.enable_truncation(MAX_LEN)
    checks["tokenizers_library_tokenizer_json"] = {
        "note": "tokenizers.Tokenizer.from_file(tiny-quickgelu/tokenizer.json) with enable_truncation(77) "
                "gives the reference ids; without truncation the long text has untruncated_long ids "
                "(tokenizer.json carries no truncation setting)",
        "ids_equal": [raw.encode(t["text"]).ids == t["ids"] for t in texts_json],
        "untruncated_long": untruncated_long,
    }


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------


def write_readme(out: Path, meta: dict):
    v = meta["versions"]
    lines = [
        "# CLIP test fixtures",
        "",
        "Generated by `scripts/make_clip_fixtures.py`; do not edit by hand. From the repository root:",
        "",
        "```",
        COMMAND + "            # (re)write this folder",
        COMMAND + " --verify   # regenerate elsewhere, compare byte for byte",
        "```",
        "",
        "Versions used: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Nothing was downloaded: the models have seeded random weights, the tokenizer is built from",
        "open_clip's `bpe_simple_vocab_16e6.txt.gz` (the same file as `assets/`), and the photos are",
        "scikit-image's bundled samples (`skimage.data`).",
        "",
        "## images/",
        "",
        "| file | PIL mode | size | bytes | notes |",
        "|---|---|---|---|---|",
    ]
    for im in meta["image_details"]:
        lines.append(f"| `{im['name']}` | {im['pil_mode']} | {im['width']}x{im['height']}"
                     f"{' x' + str(im['n_frames']) + ' frames' if im['n_frames'] > 1 else ''} | {im['bytes']} | "
                     f"{im['notes']} |")
    lines += [
        "",
        "The first four (`photo_*`) are the real photos; the rest exercise decoders and colour modes.",
        "",
        "## models/",
        "",
        "Random-weight `CLIPModel`s (every parameter drawn from a seeded normal, scaled so that every",
        "component matters). All text configs: vocab 49408, max_position_embeddings 77,",
        "bos_token_id 49406, eos_token_id 49407, pad_token_id 1 (so HF pools at the first 49407).",
        "`text_config.projection_dim` / `vision_config.projection_dim` are transformers' unused",
        "defaults (512); the projection size is the top-level `projection_dim`.",
        "",
        "| model | weights | tokenizer | preprocessor | text h/ffn/layers/heads | vision h/ffn/layers/heads | image/patch | act | eps | proj | logit_scale |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in meta["models"].items():
        t, vi = m["text_config"], m["vision_config"]
        pre = m["preprocess"]
        lines.append(
            f"| `{name}` | {m['weights']} | {m['tokenizer_files'] or 'none'} | "
            f"{'preprocessor_config.json' if m['preprocessor_config_json'] else 'none'} "
            f"(edge {pre['shortest_edge']}, crop {pre['crop_size']}) | "
            f"{t['hidden_size']}/{t['intermediate_size']}/{t['num_hidden_layers']}/{t['num_attention_heads']} | "
            f"{vi['hidden_size']}/{vi['intermediate_size']}/{vi['num_hidden_layers']}/{vi['num_attention_heads']} | "
            f"{vi['image_size']}/{vi['patch_size']} | {t['hidden_act']} | {t['layer_norm_eps']} | "
            f"{m['projection_dim']} | {m['logit_scale']} |")
    lines += [
        "",
        "- `tiny-quickgelu`: the reference layout: `model.safetensors`, `tokenizer.json` (the only",
        "  model shipping it; transformers' output re-serialized as compact JSON, same content),",
        "  `preprocessor_config.json`.",
        "- `tiny-gelu`: a weights-only fine-tune (what `Trainer.save_model` leaves): `config.json` +",
        "  `pytorch_model.bin` (torch zip format), no tokenizer and no preprocessor config. A consumer",
        "  falls back to the standard CLIP tokenizer and to *standard preprocessing*: CLIPImageProcessor's",
        "  defaults (bicubic resize of the shortest edge, center crop, rescale 1/255, OpenAI mean",
        "  `[0.48145466, 0.4578275, 0.40821073]` / std `[0.26862954, 0.26130258, 0.27577711]`) with",
        "  `shortest_edge = crop_size = vision_config.image_size` (48).",
        f"- `tiny-sharded`: `save_pretrained(max_shard_size=\"{SHARD_SIZE}\")`: two safetensors shards +",
        "  `model.safetensors.index.json`; slow tokenizer files (`vocab.json` + `merges.txt`); its",
        "  preprocessor resizes to 44 then crops 40, with mean = std = 0.5.",
        "- `tiny-st`: sentence-transformers layout: `modules.json` -> `0_CLIPModel/` (type",
        "  `sentence_transformers.models.CLIPModel`), holding tiny-quickgelu's weights (safetensors),",
        "  slow tokenizer files and `preprocessor_config.json`. This is the layout sentence-transformers",
        "  <= 5 saved (and the hub's `sentence-transformers/clip-ViT-B-32` has); sentence-transformers 6",
        "  saves the module at the root instead but still loads this layout (checked).",
        "",
        "## references.safetensors / references.json",
        "",
        "All float32 unless noted; the batch dimension is dropped.",
        "",
        "| tensor | shape | what |",
        "|---|---|---|",
        "| `MODEL/text/I` | [projection_dim] | `get_text_features(input_ids, attention_mask=ones)` of text I (ids in references.json, not padded) |",
        "| `MODEL/text_pooled/I` | [text hidden] | `text_model(...).pooler_output` (before the projection) |",
        "| `MODEL/text_hidden/I` | [tokens, text hidden] | `text_model(...).last_hidden_state` (after final_layer_norm) |",
        "| `MODEL/pixels/IMAGE` | [3, crop, crop] | the model's preprocessing (CLIPImageProcessorPil) of `Image.open(IMAGE).convert('RGB')` |",
        "| `MODEL/image/IMAGE` | [projection_dim] | `get_image_features(pixels)` |",
        "| `MODEL/image_pooled/IMAGE` | [vision hidden] | `vision_model(pixels).pooler_output` (post_layernorm of the class token, before the projection) |",
        "| `processor224/IMAGE` | [3, 224, 224] | ViT-B/32 preprocessing (edge 224, crop 224, bicubic, OpenAI mean/std), real photos only |",
        "| `decoded/IMAGE` | [height, width, 3] uint8 | `Image.open(IMAGE).convert('RGB')` (frame 0), to tell decoder differences from resize differences |",
        "",
        "MODEL is one of " + ", ".join(f"`{n}`" for n in meta["models"]) + "; I is the text's index;",
        "IMAGE is the file name in images/. references.json holds `texts` (text, `ids`), `images` (file",
        "names; `image_details` describes them), `models.NAME` (config summary, `texts` with ids and",
        "pooled position, preprocessing, files), `tensors` (name -> dtype, shape) and `checks`.",
        "",
        "Preprocessing note: transformers 5's `CLIPImageProcessor` (and AutoImageProcessor's default) is",
        "a torchvision backend; the references use `CLIPImageProcessorPil`, the PIL path that",
        "transformers 4's CLIPImageProcessor used. The two differ by one 8-bit level on some pixels",
        "(two when upscaling a small photo to 224) and the features by up to ~2e-3",
        "(`checks.torchvision_backend_vs_pil_backend`).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def generate(out: Path):
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    log(f"writing {out}: images")
    images = make_images(out / "images")

    vocab, merges = clip_vocab_and_merges()
    fast_tok = build_tokenizer(vocab, merges)
    models_dir = out / "models"
    for name, spec in MODELS.items():
        log(f"model {name}")
        save_model(name, spec, models_dir, vocab, merges, fast_tok)
    save_st(models_dir, models_dir / ST_SOURCE)

    from transformers import AutoTokenizer, CLIPTokenizer

    tokenizers = {
        "standard": fast_tok,
        "tiny-quickgelu (tokenizer.json, AutoTokenizer)": AutoTokenizer.from_pretrained(str(models_dir / "tiny-quickgelu")),
        "tiny-sharded (vocab.json+merges.txt, CLIPTokenizer)": CLIPTokenizer.from_pretrained(str(models_dir / "tiny-sharded")),
        "tiny-st (vocab.json+merges.txt, AutoTokenizer)": AutoTokenizer.from_pretrained(str(hf_dir(models_dir, ST_NAME))),
    }
    for t in tokenizers.values():
        assert t.model_max_length == MAX_LEN, t

    checks: dict = {"tokenizers_agree": sorted(tokenizers)}
    log("references")
    tensors, texts_json, models_json = build_references(out, images, tokenizers, checks)
    log("checks")
    run_checks(out, tensors, texts_json, images, checks)

    tensors = {k: v.detach().contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(out / "references.safetensors"), metadata={"generator": "scripts/make_clip_fixtures.py"})

    meta = {
        "generator": "scripts/make_clip_fixtures.py",
        "command": COMMAND,
        "versions": versions(),
        "constants": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id_config": 1,
                      "tokenizer_pad_token": "<|endoftext|> (49407)", "vocab_size": VOCAB_SIZE,
                      "max_length": MAX_LEN},
        "tensor_naming": {
            "MODEL/text/I": "get_text_features for text I, [projection_dim]",
            "MODEL/text_pooled/I": "text_model pooler_output (pre-projection), [text hidden]",
            "MODEL/text_hidden/I": "text_model last_hidden_state (after final_layer_norm), [tokens, text hidden]",
            "MODEL/pixels/IMAGE": "CLIPImageProcessorPil output for the model, [3, crop, crop]",
            "MODEL/image/IMAGE": "get_image_features(pixels), [projection_dim]",
            "MODEL/image_pooled/IMAGE": "vision_model pooler_output (pre-projection), [vision hidden]",
            "processor224/IMAGE": "CLIPImageProcessorPil() defaults (ViT-B/32: edge 224, crop 224), photos only, [3, 224, 224]",
            "decoded/IMAGE": "Image.open(IMAGE).convert('RGB'), uint8 [height, width, 3]",
        },
        "texts": texts_json,
        "layout": {
            "texts": "[{index, text, ids (tokenizer(text, truncation=True, max_length=77), not padded), "
                     "num_tokens, untruncated_num_tokens, truncated}]; the same for every model",
            "images": "file names in images/, in order; image_details has format, PIL mode, size, notes",
            "models.NAME.texts": "[{index, text, ids, pooled_index}] (ids identical to texts[].ids)",
        },
        "images": [im["name"] for im in images],
        "image_details": images,
        "models": models_json,
        "checks": checks,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
    }
    write_json(out / "references.json", meta)
    write_readme(out, meta)
    return meta


def main():
    fixture_common.run(__doc__.split("\n")[0], DEFAULT_OUT, generate,
                    lambda meta: print(json.dumps(meta["checks"], indent=1, ensure_ascii=False)))



if __name__ == "__main__":
    main()
