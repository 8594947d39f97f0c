"""A tiny deterministic embedding model for `llm`, so tests build an embeddings.db offline.

Text "<group>|<rest>" embeds as base(group) + 0.15 * noise(text): items of a group are near
neighbours, groups are far apart. Vectors come from SHA-256 only, the same on every machine.
"""
import hashlib
import struct

import llm

DIMS = 16


def _unit_floats(seed: str):
    out, counter = [], 0
    while len(out) < DIMS:
        digest = hashlib.sha256(f"{counter}:{seed}".encode()).digest()
        out.extend(u / 2**31 - 1.0 for (u,) in struct.iter_unpack("<I", digest))
        counter += 1
    return out[:DIMS]


def embed(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    base = _unit_floats("base:" + text.split("|", 1)[0])
    noise = _unit_floats("noise:" + text)
    return [b + 0.15 * n for b, n in zip(base, noise)]


class TinyHash(llm.EmbeddingModel):
    model_id = "tiny-hash"
    supports_text = True
    supports_binary = True
    batch_size = 64

    def embed_batch(self, items, *, key=None):
        for item in items:
            yield embed(item)


@llm.hookimpl
def register_embedding_models(register):
    register(TinyHash())
