#!/usr/bin/env python3
"""Writes the demo collection of `make demo`: 20,000 artifacts with museum-style metadata and
64-dimensional float32 embeddings (little-endian blobs, as llm and sqlite-vec store them).

Until the CLIP model lands, embeddings are synthetic and seeded: the sum of a direction for the
object type, one for the material, one for the period, and noise — so nearest neighbours really
are similar objects and every search can be checked by eye.

    python3 examples/demo_collection.py dist/demo.db
"""
import random
import sqlite3
import struct
import sys

DIMS = 64
TYPES = ["coin", "vessel", "sherd", "figurine", "lamp", "fibula", "loom weight", "spindle whorl"]
MATERIALS = ["bronze", "terracotta", "glass", "silver", "bone"]
PERIODS = ["Archaic", "Classical", "Hellenistic", "Republican", "Imperial", "Late Antique"]
SITES = [("Gabii", "Lazio"), ("Poggio Civitate", "Tuscany"), ("Pompeii", "Campania"),
         ("Ostia", "Lazio"), ("Veii", "Lazio")]


def main(path, n=20_000, seed=42):
    rng = random.Random(seed)
    direction = lambda: [rng.gauss(0, 1) for _ in range(DIMS)]
    dirs = {name: direction() for name in TYPES + MATERIALS + PERIODS}
    db = sqlite3.connect(path)
    db.executescript(
        """DROP TABLE IF EXISTS artifacts;
        CREATE TABLE artifacts(id INTEGER PRIMARY KEY, object_type TEXT, material TEXT,
          period TEXT, site TEXT, region TEXT, embedding BLOB);"""
    )
    rows = []
    for i in range(1, n + 1):
        t, m, p = rng.choice(TYPES), rng.choice(MATERIALS), rng.choice(PERIODS)
        site, region = rng.choice(SITES)
        v = [1.0 * a + 0.7 * b + 0.5 * c + 0.9 * rng.gauss(0, 1)
             for a, b, c in zip(dirs[t], dirs[m], dirs[p])]
        rows.append((i, t, m, p, site, region, struct.pack(f"<{DIMS}f", *v)))
    db.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dist/demo.db")
