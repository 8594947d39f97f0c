"""What the fixture generators share: small helpers, and the command line (write the fixture
folder and list its files, or `--verify`: regenerate into a temporary folder and compare byte
for byte)."""
import argparse
import filecmp
import platform
import sys
import tempfile
from pathlib import Path


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fmt(x: float) -> float:
    """A float for JSON, short and stable."""
    return float(f"{float(x):.4g}")


def maxdiff(a, b) -> float:
    """Largest absolute difference of two torch tensors, in float64."""
    return fmt((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def versions(dists) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in dists:
        out[dist] = md.version(dist)
    return out


def summary(out: Path):
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            n = p.stat().st_size
            total += n
            print(f"{n:>10}  {p.relative_to(out)}")
    print(f"{total:>10}  total ({total / 1e6:.2f} MB)")


def run(description, default_out: Path, generate, report):
    """`generate(folder) -> meta`; `report(meta)` prints what a rewrite produced."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--verify", action="store_true",
                    help="regenerate into a temporary folder and compare with --out byte for byte")
    args = ap.parse_args()
    if args.verify:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / default_out.name
            generate(fresh)
            a = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
            b = sorted(str(p.relative_to(args.out)) for p in args.out.rglob("*") if p.is_file())
            bad = sorted(set(a) ^ set(b))
            bad += [f for f in sorted(set(a) & set(b)) if not filecmp.cmp(fresh / f, args.out / f, shallow=False)]
            for f in bad:
                print("DIFFERS:", f)
            print("verify:", "OK, byte-identical" if not bad else f"{len(bad)} files differ")
            sys.exit(1 if bad else 0)
    meta = generate(args.out)
    summary(args.out)
    report(meta)
