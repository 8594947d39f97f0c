#!/usr/bin/env python3
"""Writes the demo collection of `make demo`: a few thousand artifact photographs (generated,
seeded) with museum-style metadata shaped like Open Context records, into one SQLite database
with the images as PNG BLOBs.

Each image shows one object on a photographer's backdrop: its type sets the shape (coin, vessel,
sherd, figurine, lamp, fibula), its material the colour and sheen (bronze, terracotta, glass,
silver, bone), its decoration a visible pattern (plain, banded, dotted, incised), with jitter in
size, position, lighting and noise. Period, site and region are metadata only, as in a real
catalogue (a photo does not show where a find was made); captions compose every field, the way
ArchaeCLIP merged Open Context fields into captions (the `captions` view).

    python3 examples/demo_collection.py dist/demo.db [--n 3000] [--seed 42]

Needs numpy (the test venv has it: `make venv`).
"""
import argparse
import os
import sqlite3
import struct
import zlib

import numpy as np

SIZE = 64

# object type -> the materials it comes in
TYPES = {
    "coin": ["bronze", "silver"],
    "vessel": ["terracotta", "glass", "bronze"],
    "sherd": ["terracotta", "glass"],
    "figurine": ["terracotta", "bronze", "bone"],
    "lamp": ["terracotta", "bronze"],
    "fibula": ["bronze", "silver", "bone"],
}
MATERIAL_RGB = {
    "bronze": (150, 110, 60), "terracotta": (196, 98, 58), "glass": (90, 170, 180),
    "silver": (190, 192, 198), "bone": (226, 214, 180),
}
DECORATIONS = ["plain", "banded", "dotted", "incised"]
PERIODS = [
    ("Archaic", "6th century BCE", -600, -480), ("Classical", "5th century BCE", -480, -323),
    ("Hellenistic", "3rd century BCE", -323, -31), ("Republican", "2nd century BCE", -200, -27),
    ("Imperial", "1st century CE", -27, 284), ("Late Antique", "5th century CE", 284, 600),
]
SITES = [
    ("Gabii", "Lazio", "Italy"), ("Poggio Civitate", "Tuscany", "Italy"),
    ("Pompeii", "Campania", "Italy"), ("Ostia", "Lazio", "Italy"), ("Veii", "Lazio", "Italy"),
    ("Metaponto", "Basilicata", "Italy"), ("Corinth", "Peloponnese", "Greece"),
    ("Kenchreai", "Peloponnese", "Greece"), ("Petra", "Ma'an", "Jordan"),
]


def png(rgb):
    """A minimal RGB PNG (8-bit, no filter per row, zlib-compressed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def shape_mask(kind, x, y, rng):
    """Boolean mask of the object in centred coordinates x, y (about -1..1)."""
    if kind == "coin":
        return x * x + y * y < 0.45
    if kind == "vessel":  # amphora: body, neck, two handles
        body = (x / 0.45) ** 2 + ((y - 0.15) / 0.55) ** 2 < 1
        neck = (np.abs(x) < 0.14) & (y > -0.75) & (y < -0.3)
        handles = (np.abs(np.abs(x) - 0.3) < 0.06) & (y > -0.6) & (y < -0.25)
        return body | neck | handles
    if kind == "sherd":  # an irregular triangle
        a, b = rng.uniform(-0.3, 0.3, 2)
        return (y < 0.55 + 0.2 * a) & (y > -0.6 + 1.6 * np.abs(x - 0.2 * b) - 0.1)
    if kind == "figurine":  # head, body, base
        head = x * x + (y + 0.55) ** 2 < 0.05
        body = (np.abs(x) < 0.12 + 0.25 * (y + 0.35)) & (y > -0.35) & (y < 0.55)
        base = (np.abs(x) < 0.4) & (y > 0.55) & (y < 0.7)
        return head | body | base
    if kind == "lamp":  # oval body with a nozzle and a filling hole
        body = (x / 0.5) ** 2 + (y / 0.3) ** 2 < 1
        nozzle = (x > 0.3) & (x < 0.75) & (np.abs(y) < 0.12)
        hole = (x + 0.05) ** 2 + y * y < 0.01
        return (body | nozzle) & ~hole
    if kind == "fibula":  # a bow and a pin
        bow = (np.abs(np.sqrt(x * x + (y - 0.3) ** 2) - 0.5) < 0.09) & (y < 0.3)
        pin = (np.abs(y - 0.3) < 0.04) & (np.abs(x) < 0.6)
        return bow | pin
    raise ValueError(kind)


def render(kind, material, decoration, rng):
    c = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    scale = rng.uniform(0.85, 1.1)
    dx, dy = rng.uniform(-0.12, 0.12, 2)
    x, y = np.meshgrid((c - dx) / scale, (c - dy) / scale)
    angle = rng.uniform(-0.2, 0.2)
    x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    mask = shape_mask(kind, x, y, rng)
    backdrop = rng.choice([235.0, 60.0]) + rng.uniform(-15, 15)
    img = np.full((SIZE, SIZE, 3), backdrop) + rng.normal(0, 3, (SIZE, SIZE, 1))
    base = np.array(MATERIAL_RGB[material], dtype=float) * rng.uniform(0.85, 1.1)
    light = 1.0 - 0.25 * (x + y) / 2  # lit from the upper left
    colour = base[None, None, :] * light[..., None]
    if material in ("silver", "bronze"):  # metallic highlight
        colour += 60 * np.exp(-((x + 0.2) ** 2 + (y + 0.2) ** 2) / 0.05)[..., None]
    if material == "glass":  # translucent: the backdrop shows through
        colour = 0.6 * colour + 0.4 * backdrop
    if decoration == "banded":
        pattern = (np.floor((y + 1) * 6) % 2 == 0)
        colour = np.where(pattern[..., None], colour * 0.35, colour)
    elif decoration == "dotted":
        pattern = ((np.mod((x + 1) * 6, 1) - 0.5) ** 2 + (np.mod((y + 1) * 6, 1) - 0.5) ** 2) < 0.06
        colour = np.where(pattern[..., None], 30.0, colour)
    elif decoration == "incised":
        pattern = np.abs(np.mod((x + y + 2) * 7, 1) - 0.5) < 0.12
        colour = np.where(pattern[..., None], colour * 0.55, colour)
    img = np.where(mask[..., None], colour, img) + rng.normal(0, 4, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    if os.path.exists(args.path):
        os.remove(args.path)
    db = sqlite3.connect(args.path)
    db.executescript("""
        CREATE TABLE artifacts(
          id INTEGER PRIMARY KEY, label TEXT, object_type TEXT, material TEXT, decoration TEXT,
          period TEXT, century TEXT, start_year INTEGER, end_year INTEGER, site TEXT, region TEXT,
          country TEXT, description TEXT, split TEXT, image BLOB);
        -- Captions composed from the record's fields, as ArchaeCLIP merged Open Context fields.
        CREATE VIEW captions AS
          SELECT id, split, image,
                 'a photo of a ' || CASE decoration WHEN 'plain' THEN '' ELSE decoration || ' ' END
                 || material || ' ' || object_type || ', ' || period || ' (' || century || '), from '
                 || site || ', ' || region || ', ' || country AS caption
          FROM artifacts;
        -- Zero-shot labels: one prompt per object type and material.
        CREATE TABLE labels(id INTEGER PRIMARY KEY, object_type TEXT, material TEXT, prompt TEXT);
    """)
    kinds = list(TYPES)
    rows = []
    for i in range(1, args.n + 1):
        kind = kinds[rng.integers(len(kinds))]
        material = TYPES[kind][rng.integers(len(TYPES[kind]))]
        decoration = DECORATIONS[rng.integers(len(DECORATIONS))] if kind != "fibula" else "plain"
        period, century, start, end = PERIODS[rng.integers(len(PERIODS))]
        site, region, country = SITES[rng.integers(len(SITES))]
        description = f"{decoration.capitalize()} {material} {kind} found at {site} ({region}), {period} period."
        split = "test" if rng.random() < 0.2 else "train"
        image = png(render(kind, material, decoration, rng))
        rows.append((i, f"{site} {kind} {i}", kind, material, decoration, period, century, start, end,
                     site, region, country, description, split, image))
    db.executemany("INSERT INTO artifacts VALUES (" + ",".join("?" * 15) + ")", rows)
    db.executemany(
        "INSERT INTO labels(object_type, material, prompt) VALUES (?, ?, ?)",
        [(k, m, f"a photo of a {m} {k}") for k in TYPES for m in TYPES[k]],
    )
    db.commit()
    n_test = db.execute("SELECT count(*) FROM artifacts WHERE split = 'test'").fetchone()[0]
    print(f"{args.path}: {args.n} artifacts ({args.n - n_test} train, {n_test} test), {len(rows[0][-1])}-byte PNGs")


if __name__ == "__main__":
    main()
