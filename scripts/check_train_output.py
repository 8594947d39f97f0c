#!/usr/bin/env python3
"""Checks that a directory written by clip_train loads in transformers and sentence-transformers
with no missing or unexpected keys, and that both give the embeddings archaeclip gives.

Developer-run (torch, transformers and sentence-transformers are not CI dependencies):

    make build
    /tmp/refvenv/bin/python scripts/check_train_output.py     # trains a tiny model, then checks

It trains tests/fixtures/clip/models/tiny-quickgelu for a few steps on tests/fixtures/train
through the built extension (loaded into Debian's /usr/bin/python3, whose sqlite3 can load
extensions), then loads the output with CLIPModel.from_pretrained (output_loading_info=True),
CLIPProcessor.from_pretrained and SentenceTransformer, and compares text and image embeddings.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

try:  # transformers 5: the PIL processor (CLIPImageProcessor is the torchvision one there)
    from transformers import CLIPImageProcessorPil
except ImportError:
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures", "train")
TINY = os.path.join(REPO, "tests", "fixtures", "clip", "models", "tiny-quickgelu")

TRAIN = r"""
import json, os, sqlite3, sys
repo, fix, tiny, out = sys.argv[1:5]
db = sqlite3.connect(":memory:")
db.enable_load_extension(True)
db.load_extension(os.path.join(repo, "dist", "archaeclip"))
db.execute("CREATE TABLE pairs(image BLOB, caption TEXT)")
pairs = json.load(open(os.path.join(fix, "pairs.json")))
for p in pairs:
    db.execute("INSERT INTO pairs VALUES (?, ?)", (open(os.path.join(fix, p["image"]), "rb").read(), p["caption"]))
db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (tiny,))
opts = json.dumps({"output": out, "batch_size": 4, "epochs": 3, "lr": 1e-3})
rows = db.execute("SELECT kind, step, loss FROM clip_train('tiny', 'SELECT image, caption FROM pairs', ?)", (opts,)).fetchall()
emb = {
    "text": [list(memoryview(db.execute("SELECT clip_embed_text(?, 'trained')", (p["caption"],)).fetchone()[0]).cast("f")) for p in pairs],
    "image": [list(memoryview(db.execute("SELECT clip_embed_image(?, 'trained')", (os.path.join(fix, p["image"]),)).fetchone()[0]).cast("f")) for p in pairs],
    "steps": [r for r in rows if r[0] == "train"],
}
print(json.dumps(emb))
"""


def main():
    out = os.path.join(tempfile.mkdtemp(prefix="archaeclip-check-"), "trained")
    res = subprocess.run(["/usr/bin/python3", "-c", TRAIN, REPO, FIX, TINY, out], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr)
    ours = json.loads(res.stdout)
    print(f"trained {len(ours['steps'])} steps, losses {[round(s[2], 4) for s in ours['steps']]}")
    print("files:", sorted(os.listdir(out)))

    model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    print("transformers loading info:", info)
    assert not problems, f"transformers: {problems}"
    processor = CLIPProcessor.from_pretrained(out)
    pairs = json.load(open(os.path.join(FIX, "pairs.json")))
    images = [Image.open(os.path.join(FIX, p["image"])).convert("RGB") for p in pairs]
    captions = [p["caption"] for p in pairs]
    with torch.no_grad():
        t = model.get_text_features(**processor.tokenizer(captions, padding=True, return_tensors="pt"))
        i = model.get_image_features(**CLIPImageProcessorPil.from_pretrained(out)(images, return_tensors="pt"))
    # transformers 5 returns BaseModelOutputWithPooling (pooler_output = the projected features).
    t = getattr(t, "pooler_output", t)
    i = getattr(i, "pooler_output", i)
    t = (t / t.norm(dim=-1, keepdim=True)).numpy()
    i = (i / i.norm(dim=-1, keepdim=True)).numpy()
    dt = np.abs(t - np.array(ours["text"])).max()
    di = np.abs(i - np.array(ours["image"])).max()
    print(f"transformers vs archaeclip on the trained model: text max diff {dt:.2e}, image max diff {di:.2e}")
    assert dt < 1e-4 and di < 1e-4, (dt, di)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(out, device="cpu")
    st_t = st.encode(captions, normalize_embeddings=True)
    dst = np.abs(st_t - np.array(ours["text"])).max()
    print(f"sentence-transformers loads it: modules {[type(m).__name__ for m in st]}, text max diff {dst:.2e}")
    assert dst < 1e-4
    print("OK")


if __name__ == "__main__":
    main()
