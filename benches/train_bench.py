#!/usr/bin/env python3
"""One CLIP fine-tuning step: archaeclip's clip_train (the built extension, through SQL) against a
plain torch/transformers training step, on one ViT-B/32-shaped model with identical seeded random
weights, 2 threads each, at batch 32 and 64.

Developer-run (torch and transformers are not CI dependencies), from a venv made from Debian's
/usr/bin/python3 so that sqlite3 can load the extension (see benches/clip_bench.py):

    make build && /tmp/refvenv/bin/python benches/train_bench.py           # batch 32 and 64
    /tmp/refvenv/bin/python benches/train_bench.py --quick                  # smoke run: batch 8, 2 steps
    /tmp/refvenv/bin/python benches/train_bench.py --only torch             # torch half only
    /tmp/refvenv/bin/python benches/train_bench.py --bf16 --batches 32      # plus both in bf16
    /tmp/refvenv/bin/python benches/train_bench.py --rounds 3               # engines alternated 3 times
    /tmp/refvenv/bin/python benches/train_bench.py --captions mixed         # captions of 12-60 tokens
    /tmp/refvenv/bin/python benches/train_bench.py --interleave --steps 7   # steps alternated one by one
    /tmp/refvenv/bin/python benches/train_bench.py --interleave --onednn    # plus torch on oneDNN products

Each (engine, batch) runs in a fresh subprocess, so that its peak RSS (getrusage ru_maxrss) is its
own. With --interleave both engines' subprocesses are loaded at once and the parent asks each for one
step at a time, alternating (torch, archaeclip, archaeclip, torch, ...) with a pause before each step;
on a shared VM whose speed drifts over minutes, both engines then meet the same spells. The parent
records the CPU the waiting engine used during each step (none expected).

Both do the same full fine-tune step (both towers forward, CLIP contrastive loss, backward, global
grad-norm clipping at 1.0, AdamW with weight decay 0.2 on ndim >= 2 tensors only, logit_scale
clamp), lr 1e-5:
  - torch: one fixed batch of preprocessed pixels + token ids padded to the batch's longest
    (captions of ~12 tokens; --captions mixed: 12-60),
    1 warm-up step, then the median of --steps timed steps.
  - torch-onednn (--onednn): the same torch step with every nn.Linear's three products (forward,
    dX, dW) computed by oneDNN (torch.ops.mkldnn._linear_pointwise, operands made contiguous),
    instead of aten's MKL sgemm. Plain float32 torch does not do this; it is here because MKL's
    sgemm does not use AVX-512 on AMD CPUs (~210 GFLOP/s on 2 Zen 5 cores, against oneDNN's ~440),
    so that archaeclip is also compared with torch's fastest float32 products on such a machine.
  - archaeclip: clip_train over a table of JPEGs (256x256, so every image is resized and cropped)
    and captions, max_steps = --steps + 1, no shuffle; the step time is the difference of
    consecutive `elapsed_s`, the first step skipped, median. It INCLUDES reading, decoding and
    preprocessing each batch (overlapped with compute on a background thread), which torch's
    number does not.
Nothing is downloaded: the config is openai/clip-vit-base-patch32's, written out by hand; the
tokenizer files are copied from tests/fixtures/clip/models/tiny-quickgelu (the standard CLIP
tokenizer).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXT = os.path.join(REPO, "dist", "archaeclip")
TOKENIZER_SRC = os.path.join(REPO, "tests", "fixtures", "clip", "models", "tiny-quickgelu")
THREADS = 2
ENGINES = ["torch", "archaeclip", "torch-bf16", "archaeclip-bf16", "torch-onednn"]
LR = 1e-5
WEIGHT_DECAY = 0.2
IMAGE_SIDE = 256

ADJ = ["bronze", "silver", "painted", "broken", "carved", "glazed", "small", "ancient", "red", "black"]
NOUN = ["coin", "vase", "lamp", "statue", "bowl", "brooch", "tile", "amphora", "ring", "mask"]
PLACE = ["gabii", "rome", "ostia", "pompeii", "naples", "athens", "corinth", "sparta", "delphi", "cyprus"]


# Phrases a catalogue caption goes on with (--captions mixed).
MORE = ["with a red slip and black painted figures", "decorated with incised lines below the rim",
        "from a votive deposit of the sixth century bc", "with traces of white paint on the base",
        "broken in three pieces and glued together", "showing a winged figure holding a wreath",
        "photographed from above on a grey card"]


def caption(i: int, mixed: bool = False) -> str:
    """About 12 tokens with bos/eos: 'a photo of a bronze coin found at gabii'. `mixed`: the same
    followed by 0-6 more phrases, 12-60 tokens (a batch's mean ~36), as catalogue captions vary."""
    base = f"a photo of a {ADJ[i % 10]} {NOUN[(i // 10) % 10]} found at {PLACE[(i // 100) % 10]}"
    more = (i * 5) % 7 if mixed else 0
    return ", ".join([base] + [MORE[(i + j) % len(MORE)] for j in range(more)])


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# Setup (parent process): model directory and the pairs database
# ----------------------------------------------------------------------------------------------


def build_model(root: str) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512,
    )
    model = CLIPModel(config)
    d = os.path.join(root, "b32")
    model.save_pretrained(d)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copyfile(os.path.join(TOKENIZER_SRC, f), os.path.join(d, f))
    CLIPImageProcessorPil().save_pretrained(d)  # ViT-B/32 defaults: shortest edge 224, crop 224
    return d


def build_pairs(root: str, n: int, mixed: bool = False) -> str:
    """n JPEGs (a colour gradient plus noise, IMAGE_SIDE square, quality 90) with captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32) / IMAGE_SIDE
    path = os.path.join(root, "pairs.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE pairs(id INTEGER PRIMARY KEY, image BLOB, caption TEXT)")
    for i in range(n):
        c = rng.uniform(0, 255, (3,)).astype(np.float32)
        base = np.stack([c[0] * xx, c[1] * yy, c[2] * (1 - xx)], -1)
        a = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        b = io.BytesIO()
        Image.fromarray(a, "RGB").save(b, format="JPEG", quality=90)
        db.execute("INSERT INTO pairs(id, image, caption) VALUES (?, ?, ?)", (i + 1, b.getvalue(), caption(i, mixed)))
    db.commit()
    db.close()
    return path


def archaeclip_available() -> str | None:
    """None if clip_train can be used, else why not."""
    if not os.path.exists(EXT + ".so"):
        return f"{EXT}.so not found (run `make build`)"
    try:
        db = sqlite3.connect(":memory:")
        db.enable_load_extension(True)
        db.load_extension(EXT)
    except Exception as e:  # noqa: BLE001
        return f"cannot load {EXT}.so: {e}"
    mods = {r[0] for r in db.execute("SELECT name FROM pragma_module_list")}
    if "clip_train" not in mods:
        return "this build of archaeclip has no clip_train table-valued function"
    return None


# ----------------------------------------------------------------------------------------------
# Workers (one fresh subprocess per engine and batch size)
# ----------------------------------------------------------------------------------------------


def onednn_linears(model) -> int:
    """Routes every nn.Linear of `model` through oneDNN: y = x·Wᵀ + b forward, dX = dY·W and
    dW = dYᵀ·X backward, each one `torch.ops.mkldnn._linear_pointwise` (which computes A·Bᵀ) on
    contiguous operands, and db = the column sums of dY. Returns how many layers it routed."""
    import torch

    linear = torch.ops.mkldnn._linear_pointwise

    class OnednnLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            ctx.save_for_backward(x2, w)
            ctx.has_bias = b is not None
            return linear(x2, w, b, "none", [], "").reshape(*x.shape[:-1], w.shape[0])

        @staticmethod
        def backward(ctx, dy):
            x2, w = ctx.saved_tensors
            dy2 = dy.reshape(-1, w.shape[0]).contiguous()
            dx = dw = db = None
            if ctx.needs_input_grad[0]:
                dx = linear(dy2, w.t().contiguous(), None, "none", [], "").reshape(*dy.shape[:-1], w.shape[1])
            if ctx.needs_input_grad[1]:
                dw = linear(dy2.t().contiguous(), x2.t().contiguous(), None, "none", [], "")
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.sum(0)
            return dx, dw, db

    # The routed layer against aten's on a small odd shape, forward and all three gradients,
    # before anything is timed with it.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 70, generator=g, requires_grad=True)
    ref = torch.nn.Linear(70, 45)
    dy = torch.randn(3, 37, 45, generator=g)
    outs = []
    for f in (ref.forward, lambda v: OnednnLinear.apply(v, ref.weight, ref.bias)):
        x.grad = ref.weight.grad = ref.bias.grad = None
        y = f(x)
        y.backward(dy)
        outs.append([y.detach(), x.grad, ref.weight.grad, ref.bias.grad])
    for name, a, b in zip(["y", "dX", "dW", "db"], *outs):
        err = float((a - b).abs().max() / b.abs().max())
        if err > 1e-5:
            raise RuntimeError(f"oneDNN linear's {name} differs from aten's: max relative error {err:.2e}")

    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = (lambda m: lambda x: OnednnLinear.apply(x, m.weight, m.bias))(mod)
            n += 1
    return n


def setup_torch(model_dir: str, db_path: str, batch: int, bf16: bool = False, onednn: bool = False):
    """torch's model, optimizer and fixed batch; returns (step, info): step() runs one full
    fine-tune step and returns its loss. onednn: the linear layers' products on oneDNN
    (`onednn_linears`)."""
    import contextlib

    import torch
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT image, caption FROM pairs ORDER BY id LIMIT ?", (batch,)).fetchall()
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)
    tok = CLIPTokenizer.from_pretrained(model_dir)
    pixels = proc([Image.open(io.BytesIO(r[0])).convert("RGB") for r in rows], return_tensors="pt")["pixel_values"]
    text = tok([r[1] for r in rows], padding=True, return_tensors="pt")
    tokens = round(float(text["attention_mask"].sum(1).float().mean()), 1)

    model = CLIPModel.from_pretrained(model_dir).train()
    if onednn:
        onednn_linears(model)
    rss_loaded = rss_now_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=LR, betas=(0.9, 0.999), eps=1e-8)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        # bf16: torch's CPU autocast (matmuls and linear layers in bf16, on oneDNN; the backward
        # pass follows the forward's dtypes), the counterpart of archaeclip's precision 'bf16'.
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with mixed:
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels,
                        return_loss=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)
        return out.loss.item()

    info = {"engine": "torch-bf16" if bf16 else "torch-onednn" if onednn else "torch", "batch": batch, "mean_tokens": tokens,
            "num_parameters": sum(p.numel() for p in params), "rss_after_load_mib": rss_loaded}
    return step, info


def worker_torch(model_dir: str, db_path: str, batch: int, steps: int, bf16: bool = False,
                 onednn: bool = False) -> dict:
    step, info = setup_torch(model_dir, db_path, batch, bf16, onednn)
    t0 = time.perf_counter()
    first_loss = step()  # warm-up (also allocates the AdamW state)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(info, s_per_step=statistics.median(times), times=times, warmup_s=warm, first_loss=first_loss,
                rss_end_mib=rss_now_mib(), peak_rss_mib=peak_rss_mib())


def start_archaeclip(db: sqlite3.Connection, model_dir: str, batch: int, steps: int, out_dir: str,
                     precision: str = "fp32"):
    """Starts clip_train over the first batch x (steps + 1) pairs: returns (cursor, how the model
    was given). Each row fetched from the cursor is one step, run when it is fetched."""
    max_steps = steps + 1
    n = batch * max_steps
    stmt = f"SELECT image, caption FROM pairs WHERE id <= {n} ORDER BY id"
    sql = ("SELECT kind, step, loss, examples_per_s, elapsed_s FROM clip_train(?, ?, json_object("
           "'output', ?, 'batch_size', ?, 'max_steps', ?, 'lr', ?, 'save_every', 0, 'shuffle', json('false'), "
           "'save_optimizer', json('false'), 'overwrite', json('true')"
           + (f", 'precision', '{precision}'" if precision != "fp32" else "") + "))")
    try:
        return db.execute(sql, (model_dir, stmt, out_dir, batch, max_steps, LR)), "path"
    except sqlite3.Error as e:
        # the model argument may only accept a registered name: register the directory and retry
        first_error = str(e)
        if "no such table" in first_error:
            raise
        db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('train_bench_b32', ?)", (model_dir,))
        try:
            cur = db.execute(sql, ("train_bench_b32", stmt, out_dir, batch, max_steps, LR))
        except sqlite3.Error as e2:
            raise sqlite3.Error(f"{e2} (with the path: {first_error})") from e2
        return cur, f"registered name (path failed: {first_error})"


def connect_archaeclip(db_path: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path)
    db.enable_load_extension(True)
    db.load_extension(EXT)
    return db


def worker_archaeclip(model_dir: str, db_path: str, batch: int, steps: int, precision: str = "fp32") -> dict:
    db = connect_archaeclip(db_path)
    out_dir = tempfile.mkdtemp(prefix="train-bench-out-")
    t0 = time.perf_counter()
    try:
        cur, model_arg = start_archaeclip(db, model_dir, batch, steps, out_dir, precision)
        rows = cur.fetchall()
    except sqlite3.Error as e:
        return {"engine": "archaeclip", "batch": batch, "error": str(e)}
    finally:
        total = time.perf_counter() - t0
        shutil.rmtree(out_dir, ignore_errors=True)
    train = sorted((r for r in rows if r[0] == "train"), key=lambda r: r[1])
    if len(train) < 2:
        return {"engine": "archaeclip", "batch": batch, "error": f"expected {steps + 1} 'train' rows, got {rows!r}"}
    elapsed = [r[4] for r in train]
    diffs = [b - a for a, b in zip(elapsed, elapsed[1:])]  # step 1 (warm-up) skipped
    return {"engine": "archaeclip", "batch": batch, "s_per_step": statistics.median(diffs), "times": diffs,
            "first_step_s": elapsed[0], "first_loss": train[0][2], "losses": [r[2] for r in train],
            "reported_examples_per_s": [r[3] for r in train], "kinds": sorted({r[0] for r in rows}),
            "total_s_including_save": total, "model_arg": model_arg, "peak_rss_mib": peak_rss_mib()}


def serve(engine: str, model_dir: str, db_path: str, batch: int, steps: int) -> int:
    """--interleave's worker: loads, runs the warm-up step, prints READY, then runs one step per
    'step' line on stdin (printing STEP <seconds>) until 'quit' (printing RESULT)."""
    precision = "bf16" if engine.endswith("-bf16") else "fp32"
    out_dir = tempfile.mkdtemp(prefix="train-bench-out-")
    try:
        if engine.startswith("torch"):
            step, info = setup_torch(model_dir, db_path, batch, precision == "bf16", engine == "torch-onednn")
        else:
            db = connect_archaeclip(db_path)
            # Python's sqlite3 cursor steps to the next row as it returns one, so each fetchone()
            # below runs the step after the row it returns: one step more than `steps` + 1
            # keeps the last fetch a full step (not the end of training and the final save).
            cur, model_arg = start_archaeclip(db, model_dir, batch, steps + 1, out_dir, precision)
            info = {"engine": engine, "batch": batch, "model_arg": model_arg}

            def step() -> float:
                # clip_train runs a step each time a row is asked for; rows other than 'train'
                # (none with these options) would be skipped.
                while True:
                    row = cur.fetchone()
                    if row is None:
                        raise RuntimeError("clip_train ended before the last step")
                    if row[0] == "train":
                        return row[2]
        first_loss = step()  # warm-up (torch: also allocates the AdamW state; archaeclip: loads, steps 1 and 2)
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t = time.perf_counter()
            step()
            print(f"STEP {time.perf_counter() - t}", flush=True)
        print("RESULT " + json.dumps(dict(info, first_loss=first_loss, peak_rss_mib=peak_rss_mib())), flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def busy_cpu_s() -> float | None:
    """CPU seconds spent busy by the whole machine so far (/proc/stat; None where unavailable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_worker(engine: str, model_dir: str, db_path: str, batch: int, steps: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model-dir", model_dir,
           "--db", db_path, "--batch", str(batch), "--steps", str(steps)]

    def children_cpu_s():
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return c.ru_utime + c.ru_stime

    busy0, own0, t0 = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    busy1, own, wall = busy_cpu_s(), children_cpu_s() - own0, time.perf_counter() - t0
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            if busy0 is not None and busy1 is not None:
                # other processes' CPU use during the run, in cores: a noisy machine shows here
                r["other_load_cores"] = max(0.0, (busy1 - busy0 - own) / wall)
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"engine": engine, "batch": batch, "error": f"worker exited {p.returncode}: " + " | ".join(tail)}


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process pid, its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """An --interleave worker process: one step per step() call."""

    def __init__(self, engine: str, model_dir: str, db_path: str, batch: int, steps: int):
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--serve", "--model-dir", model_dir,
               "--db", db_path, "--batch", str(batch), "--steps", str(steps)]
        self.engine = engine
        self.p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.expect("READY")

    def expect(self, prefix: str) -> str:
        for line in self.p.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.engine} worker exited ({self.p.wait()}) before {prefix}")

    def step(self) -> float:
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        return float(self.expect("STEP "))

    def finish(self) -> dict:
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        r = json.loads(self.expect("RESULT "))
        self.p.wait()
        return r


def interleaved(pair: list[str], model_dir: str, db_path: str, batch: int, steps: int, gap_s: float) -> dict:
    """Both engines loaded side by side, their steps alternated one at a time (which goes first
    alternates too), with a pause of gap_s before each step: slow and fast spells of a shared
    machine fall on both. Records, for each step, the CPU time the waiting engine and everything
    else used meanwhile."""
    servers = []
    times = {e: [] for e in pair}
    waiting_cpu, other_cores = [], []
    try:
        for e in pair:
            servers.append(Server(e, model_dir, db_path, batch, steps))
        for i in range(steps):
            for s in servers if i % 2 == 0 else servers[::-1]:
                time.sleep(gap_s)
                idle = next(o for o in servers if o is not s)
                cpu0, busy0, own0, t0 = proc_cpu_s(idle.p.pid), busy_cpu_s(), proc_cpu_s(s.p.pid), time.perf_counter()
                seconds = s.step()
                cpu1, busy1, own1, wall = proc_cpu_s(idle.p.pid), busy_cpu_s(), proc_cpu_s(s.p.pid), time.perf_counter() - t0
                times[s.engine].append(seconds)
                waiting_cpu.append(cpu1 - cpu0)
                if busy0 is not None and busy1 is not None:
                    other_cores.append(max(0.0, (busy1 - busy0 - (own1 - own0) - (cpu1 - cpu0)) / wall))
                print(f"    step {i + 1} {s.engine}: {seconds:.3f} s (the other engine used {cpu1 - cpu0:.2f} CPU s, "
                      f"other processes {other_cores[-1] if other_cores else float('nan'):.2f} cores)", flush=True)
        results = {s.engine: s.finish() for s in servers}
    finally:
        for s in servers:
            if s.p.poll() is None:
                s.p.kill()
    a, b = pair
    return {"times": times, "results": results, "ratios": [x / y for x, y in zip(times[a], times[b])],
            "waiting_cpu_s": max(waiting_cpu), "other_cores": max(other_cores, default=float("nan"))}


def table_head(what: str, columns: str) -> None:
    """A results table's title line and header (the two RSS columns appended) with its rule."""
    print(f"\nOne full fine-tune step, {what}, {THREADS} threads, {os.cpu_count()} CPUs here")
    hdr = columns + f"{'torch RSS':>11}{'arch. RSS':>11}"
    print(hdr)
    print("-" * len(hdr))


def main_interleaved(args, batches, steps, model_dir, db_path) -> None:
    pairs = ([["torch", "archaeclip"]] + ([["torch-onednn", "archaeclip"]] if args.onednn else [])
             + ([["torch-bf16", "archaeclip-bf16"]] if args.bf16 else []))
    rows = []
    for b in batches:
        for pair in pairs:
            print(f"  {pair[0]} and {pair[1]} side by side, batch {b}, {steps} steps each, alternated ...", flush=True)
            try:
                r = interleaved(pair, model_dir, db_path, b, steps, args.gap)
            except RuntimeError as e:
                # e.g. archaeclip-bf16 on a CPU without AMX or AVX512_BF16: its worker printed why above
                print(f"    skipped: {e}", flush=True)
                continue
            rows.append((b, pair, r))
    table_head(f"both engines loaded side by side and their steps alternated one at a time ({steps} each after 1 "
               f"warm-up, {args.gap} s pause before each)",
               f"{'config':12}{'torch s/step':>14}{'arch. s/step':>14}{'ratio':>8}{'pairs: median':>15}{'range':>14}")
    for b, (t, a), r in rows:
        mt, ma = statistics.median(r["times"][t]), statistics.median(r["times"][a])
        config = f"batch {b}" + (" bf16" if t.endswith("-bf16") else " *" if t == "torch-onednn" else "")
        rss = [f"{r['results'][e]['peak_rss_mib']:.0f} MiB" for e in (t, a)]
        lo, hi = min(r["ratios"]), max(r["ratios"])
        print(f"{config:12}{mt:>14.3f}{ma:>14.3f}{mt / ma:>7.2f}x{statistics.median(r['ratios']):>14.2f}x"
              f"{f'{lo:.2f}-{hi:.2f}x':>14}"
              f"{rss[0]:>11}{rss[1]:>11}")
        print(f"  first loss: torch {r['results'][t]['first_loss']:.6f}, archaeclip {r['results'][a]['first_loss']:.6f}; "
              f"the waiting engine used at most {r['waiting_cpu_s']:.2f} CPU s during a step, other processes at most "
              f"{r['other_cores']:.2f} cores")
    if args.onednn:
        print("* torch with every linear layer's forward, dX and dW products on oneDNN (torch-onednn, see the "
              "docstring), against archaeclip float32")
    print("ratio = torch's median s/step / archaeclip's (> 1: archaeclip faster); pairs = torch's step i / "
          "archaeclip's step i, taken next to each other. Both processes are resident together, so peak RSS is "
          "each one's own.")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 timed steps")
    ap.add_argument("--batches", default="32,64", help="comma-separated batch sizes (default 32,64)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step (default 5)")
    ap.add_argument("--only", choices=["torch", "archaeclip"], help="run one engine only")
    ap.add_argument("--bf16", action="store_true",
                    help="also run both in bf16 mixed precision (torch autocast; archaeclip's precision 'bf16', "
                         "which needs AMX or AVX512_BF16)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engines this many times each, alternated (torch, archaeclip, torch, ...); the "
                         "table gives the median over rounds and each round's ratio (default 1)")
    ap.add_argument("--captions", choices=["short", "mixed"], default="short",
                    help="short: every caption ~12 tokens (default); mixed: 12-60 tokens, which torch pads to "
                         "the batch's longest and archaeclip does not")
    ap.add_argument("--interleave", action="store_true",
                    help="load both engines side by side and alternate their steps one at a time, instead of one "
                         "process per engine run after the other: a machine whose speed drifts over minutes "
                         "affects both alike")
    ap.add_argument("--onednn", action="store_true",
                    help="with --interleave: also run torch with its linear layers' products on oneDNN against "
                         "archaeclip (torch's fastest float32 products where MKL's sgemm avoids AVX-512, as on AMD)")
    ap.add_argument("--gap", type=float, default=1.0,
                    help="with --interleave: seconds of pause before each step (default 1.0)")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker and args.serve:
        return serve(args.worker, args.model_dir, args.db, args.batch, args.steps)
    if args.worker:
        a = (args.model_dir, args.db, args.batch, args.steps)
        r = {"torch": lambda: worker_torch(*a), "archaeclip": lambda: worker_archaeclip(*a),
             "torch-bf16": lambda: worker_torch(*a, bf16=True),
             "torch-onednn": lambda: worker_torch(*a, onednn=True),
             "archaeclip-bf16": lambda: worker_archaeclip(*a, precision="bf16")}[args.worker]()
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    batches = [8] if args.quick else [int(b) for b in args.batches.split(",")]
    steps = 2 if args.quick else args.steps
    engines = [args.only] if args.only else ["torch", "archaeclip"]
    if args.bf16:
        engines += [e + "-bf16" for e in engines]
    skip = archaeclip_available() if "archaeclip" in engines else None
    if skip:
        print(f"archaeclip skipped: {skip}")
        engines = [e for e in engines if not e.startswith("archaeclip")]

    if args.interleave and (skip or args.only):
        print("--interleave needs both engines")
        return 1
    if args.onednn and not args.interleave:
        print("--onednn needs --interleave")
        return 1
    root = tempfile.mkdtemp(prefix="train-bench-")
    try:
        pairs = max(batches) * (steps + (2 if args.interleave else 1))
        print(f"building the ViT-B/32-shaped model and {pairs} JPEGs in {root} ...", flush=True)
        model_dir = build_model(root)
        db_path = build_pairs(root, pairs, args.captions == "mixed")
        if args.interleave:
            main_interleaved(args, batches, steps, model_dir, db_path)
            return 0
        runs = {}
        for b in batches:
            for e, rnd in [(e, rnd) for rnd in range(args.rounds) for e in engines]:
                print(f"  {e}, batch {b}" + (f", round {rnd + 1}" if args.rounds > 1 else "") + " ...", flush=True)
                r = run_worker(e, model_dir, db_path, b, steps)
                runs.setdefault((e, b), []).append(r)
                if "error" in r:
                    print(f"    {e} failed: {r['error']}")
                else:
                    print(f"    {r['s_per_step']:.3f} s/step median, fastest {min(r['times']):.3f} (steps: {', '.join(f'{t:.3f}' for t in r['times'])}), "
                          f"first loss {r['first_loss']:.5f}, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                          f"other processes used {r.get('other_load_cores', float('nan')):.2f} cores meanwhile"
                          + (f", model given as {r['model_arg']}" if e.startswith("archaeclip") else
                             f", RSS after loading {r['rss_after_load_mib']:.0f} MiB, at the end {r['rss_end_mib']:.0f} MiB, "
                             f"{r['mean_tokens']} tokens/caption, {r['num_parameters']:,} parameters"), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def merged(rs):
        """One engine's rounds as one result: the median of the rounds' medians, the largest peak RSS."""
        if any("error" in r for r in rs):
            return next(r for r in rs if "error" in r)
        return dict(rs[0], s_per_step=statistics.median(r["s_per_step"] for r in rs),
                    peak_rss_mib=max(r["peak_rss_mib"] for r in rs))

    results = {key: merged(rs) for key, rs in runs.items()}

    lengths = "~12-token captions" if args.captions == "short" else "captions of 12-60 tokens"
    per_round = f", median over {args.rounds} alternated rounds" if args.rounds > 1 else ""
    table_head(f"ViT-B/32-shaped random CLIP ({lengths}), median of {steps} steps after 1 warm-up{per_round}",
               f"{'config':10}{'torch s/step':>14}{'arch. s/step':>14}{'ratio':>8}{'torch ex/s':>12}{'arch. ex/s':>12}")

    def ok(r):
        return bool(r) and "error" not in r

    for b in batches:
        for suffix in ["", "-bf16"] if args.bf16 else [""]:
            t, a = results.get(("torch" + suffix, b)), results.get(("archaeclip" + suffix, b))
            sec = [f"{r['s_per_step']:.3f}" if ok(r) else "-" for r in (t, a)]
            eps = [f"{b / r['s_per_step']:.1f}" if ok(r) else "-" for r in (t, a)]
            rss = [f"{r['peak_rss_mib']:.0f} MiB" if ok(r) else "-" for r in (t, a)]
            ratio = f"{t['s_per_step'] / a['s_per_step']:.2f}x" if ok(t) and ok(a) else "-"
            config = f"batch {b}" + (" bf16" if suffix else "")
            print(f"{config:10}{sec[0]:>14}{sec[1]:>14}{ratio:>8}{eps[0]:>12}{eps[1]:>12}{rss[0]:>11}{rss[1]:>11}")
            ts, as_ = runs.get(("torch" + suffix, b), []), runs.get(("archaeclip" + suffix, b), [])
            if args.rounds > 1 and all(ok(r) for r in ts + as_) and ts and as_:
                print("  each round's ratio: " + ", ".join(
                    f"{t['s_per_step'] / a['s_per_step']:.2f}x" for t, a in zip(ts, as_)))
        t, a = results.get(("torch", b)), results.get(("archaeclip-bf16", b))
        if args.bf16 and ok(t) and ok(a):
            print(f"  batch {b}: archaeclip bf16 against torch float32: {t['s_per_step'] / a['s_per_step']:.2f}x")
    print("ratio = torch s/step / archaeclip s/step (> 1: archaeclip faster). archaeclip's step time includes "
          "reading, decoding (256x256 JPEG) and preprocessing its batch, on a background thread overlapped with "
          "compute; torch's uses a fixed, already preprocessed batch. Peak RSS is each run's own process "
          "(torch's includes the Python/torch runtime). Timings are only meaningful on an otherwise idle "
          "machine: see 'other processes used N cores' above.")
    for b in batches:
        for suffix in ["", "-bf16"] if args.bf16 else [""]:
            t, a = results.get(("torch" + suffix, b)), results.get(("archaeclip" + suffix, b))
            if ok(t) and ok(a):
                print(f"batch {b}{suffix}: loss at the initial weights on the same first batch: torch "
                      f"{t['first_loss']:.6f}, archaeclip {a['first_loss']:.6f} "
                      f"(diff {abs(t['first_loss'] - a['first_loss']):.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
