"""Writes the few hostile-input fixtures that need an encoder the Rust tests do not have
(tests/hostile.rs makes every other bad input itself, byte by byte).

    python3 -m venv /tmp/v && /tmp/v/bin/pip install pillow
    /tmp/v/bin/python scripts/make_hostile_fixtures.py

Deterministic: the same Pillow version writes the same bytes. Outputs, in tests/fixtures/hostile/:

- source_rgb.png   a 64 x 48 RGB picture (gradients, a block, a disc), the lossless reference
- palette.png      the same picture as a palette ("P") PNG with exactly its colours (lossless)
- palette_trns.png the same, with one unused palette index marked transparent (tRNS chunk)
- rgb_q95.jpg      the picture as an RGB JPEG, quality 95, no chroma subsampling
- cmyk_q95.jpg     the picture converted by Pillow to CMYK (C = 255 - R, ..., K = 0) and saved as a
                   CMYK JPEG at the same quality (Adobe-inverted, as Photoshop writes them)
"""
import os

from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hostile")


def picture():
    w, h = 64, 48
    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            # Few distinct colours (so a palette holds them all): 4 levels per channel.
            px[x, y] = ((x // 16) * 80, (y // 12) * 80, ((x + y) // 28) * 80)
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 8, 30, 26), fill=(230, 200, 40))
    draw.ellipse((36, 20, 58, 42), fill=(20, 120, 220))
    return img


def main():
    os.makedirs(OUT, exist_ok=True)
    img = picture()
    img.save(os.path.join(OUT, "source_rgb.png"), optimize=False)

    colours = sorted({c for _, c in img.getcolors(256)})
    assert len(colours) <= 255, len(colours)
    palette = Image.new("P", img.size)
    flat = [v for c in colours for v in c]
    # Index len(colours) is unused, and is the one marked transparent in palette_trns.png.
    palette.putpalette(flat + [0, 0, 0] * (256 - len(colours)))
    index = {c: i for i, c in enumerate(colours)}
    raw = img.tobytes()
    palette.putdata([index[tuple(raw[i:i + 3])] for i in range(0, len(raw), 3)])
    assert palette.convert("RGB").tobytes() == img.tobytes()
    palette.save(os.path.join(OUT, "palette.png"), optimize=False)
    palette.save(os.path.join(OUT, "palette_trns.png"), optimize=False, transparency=len(colours))

    img.save(os.path.join(OUT, "rgb_q95.jpg"), quality=95, subsampling=0)
    cmyk = img.convert("CMYK")
    cmyk.save(os.path.join(OUT, "cmyk_q95.jpg"), quality=95)
    assert Image.open(os.path.join(OUT, "cmyk_q95.jpg")).mode == "CMYK"
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()
