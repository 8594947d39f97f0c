#!/usr/bin/env python3
"""Regenerate tests/fixtures/tokenizer/, the reference for src/clip/tokenizer.rs.

Run from the repository root (a developer step; the Rust tests only read the files it writes):

    python3 -m venv /tmp/tokvenv
    /tmp/tokvenv/bin/pip install "transformers>=4.45,<5" ftfy regex
    /tmp/tokvenv/bin/pip install open_clip_torch    # optional: the cross-check against open_clip
    /tmp/tokvenv/bin/python scripts/make_tokenizer_fixtures.py

transformers 4.x is needed because 5.x dropped the pure-Python ("slow") CLIPTokenizer, which is
one of the two references compared here. ftfy is installed on purpose: with it the slow tokenizer
cleans text as OpenAI's and open_clip's tokenizers do (without it, it falls back to a BERT
BasicTokenizer that splits CJK text into single characters).

It writes, from assets/bpe_simple_vocab_16e6.txt.gz:
  vocab.json, merges.txt  built as HuggingFace converted OpenAI's tokenizer: the 256 byte-level
                          symbols, the same with "</w>", the 48,894 merges joined, then
                          <|startoftext|> and <|endoftext|> (49,408 entries); merges.txt is
                          "#version: 0.2" and the merge lines [1:49152-256-2+1] of the file.
  tokenizer.json          CLIPTokenizerFast.from_pretrained(that directory), saved compact.
  reference.json          each corpus text with the fast tokenizer's ids, computed as
                          tokenizer(text, truncation=True, max_length=77)["input_ids"]. The fast
                          tokenizer is the ground truth (the Rust `tokenizers` crate runs the same
                          pipeline). Where the slow tokenizer (or open_clip) gives other ids, the
                          case also records those ids and why; every such case must be listed in
                          CORPUS with its reason, or the script fails.
"""

import gzip
import hashlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_GZ = os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
MAX_LENGTH = 77

# Why the slow tokenizer differs from the fast one on some texts: it runs ftfy.fix_text and
# Python's str.lower(), the fast one runs NFC and a per-character lowercase.
FTFY_HTML = "ftfy.fix_text unescapes HTML entities; the fast tokenizer keeps them"
FTFY_QUOTES = "ftfy.fix_text straightens curly quotes; the fast tokenizer keeps them"
FTFY_WIDTH = "ftfy.fix_text folds fullwidth letters and digits to ASCII"
FTFY_LIGATURES = "ftfy.fix_text expands Latin ligatures (fi, fl)"
FTFY_CONTROL = "ftfy.fix_text removes control characters; the fast tokenizer keeps them"
SIGMA = "str.lower() writes a word-final capital sigma as final sigma; the fast tokenizer as medial"

LONG_WORDS = (
    "the excavation at Gabii uncovered a sequence of domestic and funerary contexts spanning the "
    "Iron Age to late antiquity including bronze coins amphora fragments loom weights lamps "
    "and a remarkable series of painted terracotta revetment plaques whose figures depict "
    "horsemen chariots and banqueting scenes typical of archaic central Italy"
).split()
# 200 words of ordinary caption vocabulary, far beyond 77 tokens.
LONG_200 = " ".join(LONG_WORDS[i % len(LONG_WORDS)] for i in range(200))

# (name, text, reason the slow tokenizer is expected to differ from the fast one, or None)
CORPUS = [
    # Plain captions.
    ("caption", "a photo of a bronze coin from Gabii", None),
    ("caption_sentence", "A terracotta amphora with two handles, found in the necropolis.", None),
    ("caption_hyphen", "fragment of a red-figure kylix", None),
    ("caption_coin", "Roman denarius of Hadrian, obverse and reverse", None),
    ("caption_photo", "a black and white photograph of an excavation trench", None),
    # Accents and other scripts.
    ("accent_cafe", "café au lait", None),
    ("accent_greek", "Ελληνικά γράμματα σε όστρακο", None),
    ("accent_dvorak", "Dvořák's Symphony No. 9", None),
    ("accent_naive", "a naïve reconstruction of the façade", None),
    ("accent_nfd", "cafe\u0301 and nai\u0308ve (decomposed accents)", None),
    ("accent_nordic", "Ångström, Øresund, Straße, Ærø", None),
    ("accent_upper", "ÉCOLE FRANÇAISE DE ROME", None),
    ("greek_final_sigma", "ΟΔΟΣ ΣΟΦΟΣ", SIGMA),
    ("cyrillic", "Древняя монета", None),
    ("arabic", "عملة برونزية", None),
    ("hebrew", "מטבע עתיק", None),
    ("thai", "ภาษาไทย", None),
    ("hindi", "हिन्दी लेख", None),
    ("turkish_dotted_i", "İstanbul ISPARTA ıı", None),
    ("sharp_s", "ß ẞ STRASSE", None),
    ("zalgo", "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307lgo", None),
    # CJK.
    ("cjk_japanese", "日本語のテキスト", None),
    ("cjk_chinese", "中文", None),
    ("cjk_korean", "한국어 텍스트", None),
    ("cjk_mixed", "Gabii 出土の青銅貨", None),
    # Emoji.
    ("emoji_pair", "🏺🪙", None),
    ("emoji_in_text", "a coin 🪙 and a vase 🏺", None),
    ("emoji_zwj_scientist", "👩\u200d🔬 archaeologist", None),
    ("emoji_zwj_family", "👨\u200d👩\u200d👧\u200d👦 family", None),
    ("emoji_modifiers_flag", "👍🏽 🇮🇹", None),
    # Punctuation and quotes.
    ("possessive", "it's the archaeologist's notebook", None),
    ("contractions", "don't, won't, can't, I'll, you're, we've, I'm, he'd", None),
    ("contractions_upper", "IT'S ALL CAPS AND DON'T", None),
    ("straight_quotes", "\"quoted\" and 'single-quoted'", None),
    ("curly_quotes", "curly \u201cquotes\u201d and \u2018apostrophes\u2019 \u2014 dashes \u2013 here", FTFY_QUOTES),
    ("punctuation_runs", "--- ... !!! ??? ;; :-)", None),
    ("hello_world", "Hello, world!", None),
    ("email_url", "e-mail: someone@example.com, see https://example.org/path?q=1&x=2", None),
    ("symbols", "C++ and C# and .NET, 50% off, $5 & €10 ±2°", None),
    # Digits.
    ("digits", "1234567890", None),
    ("numbers_in_text", "in 1873, 3.14 and 1,000,000 sesterces", None),
    ("other_numerals", "Ⅻ ½ ² ٣", None),
    ("fullwidth", "ＦＵＬＬＷＩＤＴＨ １２３", FTFY_WIDTH),
    # Mixed case.
    ("mixed_case", "CamelCaseWord and UPPER lower MiXeD", None),
    ("brands", "iPhone eBay McDonald", None),
    # Whitespace.
    ("multiple_spaces", "multiple    spaces   between words", None),
    ("tabs_newlines", "tabs\tand\nnewlines\r\nand\u00a0nbsp", None),
    ("leading_trailing", "  leading and trailing  ", None),
    ("unicode_spaces", "\u3000ideographic space\u2003em space\u2028line sep", None),
    ("zero_width", "zero\u200bwidth\u200djoiner", None),
    ("control_chars", "bell\u0007char and\u0000nul", FTFY_CONTROL),
    ("ligatures", "\ufb01nal \ufb02ow", FTFY_LIGATURES),
    # HTML-ish text.
    ("html_amp", "Tom &amp; Jerry", FTFY_HTML),
    ("html_entities", "&lt;b&gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39;", FTFY_HTML),
    ("html_tags", "<p>a <b>bold</b> caption</p>", None),
    # Lengths around and beyond max_length (77 = bos + 75 + eos).
    ("len_74_tokens", "a " * 74, None),
    ("len_75_tokens", "a " * 75, None),
    ("len_76_tokens", "a " * 76, None),
    ("long_200_words", LONG_200, None),
    ("long_single_word", "supercalifragilisticexpialidocious" * 20, None),
    ("long_emoji", "🏺" * 100, None),
    # Empty and whitespace only.
    ("empty", "", None),
    ("space", " ", None),
    ("whitespace_only", "\t\n  \r\n", None),
    # The special tokens as text.
    ("special_eot", "<|endoftext|>", None),
    ("special_both", "<|startoftext|>a photo<|endoftext|>", None),
    ("special_inside", "before <|endoftext|> after", None),
    ("special_upper", "<|ENDOFTEXT|> shouting", None),
    ("special_incomplete", "<|endoftext| and <|startoftext", None),
    ("special_open_clip_names", "<start_of_text> <end_of_text>", None),
    ("special_long", "<|endoftext|> " * 80, None),
]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, in its order (as in openai/CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges():
    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    merge_lines = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    return {token: i for i, token in enumerate(vocab)}, merge_lines


def write_case_list(path, header, cases):
    """JSON with one case per line: readable diffs, no id per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for key, value in header.items():
            f.write(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n")
        f.write('  "cases": [\n')
        f.write(",\n".join("    " + json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n  ]\n}\n")


def main():
    import tokenizers
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit("transformers 5.x has no slow CLIPTokenizer; install transformers<5 (see the top of this file)")
    try:
        import ftfy
    except ImportError:
        sys.exit("install ftfy: without it the slow CLIPTokenizer is not OpenAI's tokenizer")

    os.makedirs(OUT, exist_ok=True)
    vocab, merge_lines = clip_vocab_and_merges()
    vocab_path = os.path.join(OUT, "vocab.json")
    merges_path = os.path.join(OUT, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merge_lines) + "\n")

    slow = CLIPTokenizer(vocab_path, merges_path)
    assert slow.fix_text is not None, "the slow tokenizer is not using ftfy"
    # A directory with only vocab.json + merges.txt: from_pretrained converts the slow tokenizer,
    # as the hub's tokenizer.json files for openai/clip-vit-* were made.
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            os.symlink(os.path.join(OUT, name), os.path.join(tmp, name))
        fast = CLIPTokenizerFast.from_pretrained(tmp)
    # Saved before any call with truncation=True, which would be stored in the file.
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(fast.backend_tokenizer.to_str(pretty=False))
    assert fast.bos_token_id == 49406 and fast.eos_token_id == 49407

    open_clip_tok = None
    try:
        from open_clip.tokenizer import SimpleTokenizer, default_bpe
    except ImportError:
        print("open_clip not installed: skipping the open_clip cross-check")
    else:
        with open(default_bpe(), "rb") as f1, open(BPE_GZ, "rb") as f2:
            assert f1.read() == f2.read(), "assets/ holds another bpe file than open_clip's"
        open_clip_tok = SimpleTokenizer()
        # Same table, but open_clip names the special tokens <start_of_text>, <end_of_text>.
        renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        assert {renamed.get(t, t): i for t, i in open_clip_tok.encoder.items()} == vocab
        assert open_clip_tok.bpe_ranks == slow.bpe_ranks
        assert slow.encoder == vocab

    cases = []
    unexpected = []
    for name, text, slow_reason in CORPUS:
        ids = fast(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        slow_ids = slow(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        case = {"name": name, "text": text, "ids": ids}
        if slow_ids != ids:
            case["slow_ids"] = slow_ids
            case["slow_differs"] = slow_reason or "UNEXPECTED"
            if slow_reason is None:
                unexpected.append(f"{name}: slow tokenizer differs from fast")
        elif slow_reason is not None:
            unexpected.append(f"{name}: expected the slow tokenizer to differ ({slow_reason}), it agrees")
        if open_clip_tok is not None:
            body = open_clip_tok.encode(text)[: MAX_LENGTH - 2]
            oc_ids = [open_clip_tok.sot_token_id] + body + [open_clip_tok.eot_token_id]
            if oc_ids != ids:
                case["open_clip_ids"] = oc_ids
                if oc_ids != slow_ids:
                    # open_clip also unescapes HTML twice (html.unescape) and strips the text.
                    case["open_clip_differs_from_slow"] = True
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) <= MAX_LENGTH, name
        cases.append(case)

    header = {
        "about": "CLIP token ids for src/clip/tokenizer.rs; written by scripts/make_tokenizer_fixtures.py. "
        "ids: CLIPTokenizerFast(text, truncation=True, max_length=77)['input_ids'] (the reference). "
        "slow_ids/slow_differs: where the slow CLIPTokenizer (with ftfy) gives other ids, and why. "
        "open_clip_ids: where open_clip's SimpleTokenizer gives other ids.",
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "ftfy": ftfy.__version__,
            "open_clip": _open_clip_version(),
        },
        "bpe_sha256": hashlib.sha256(open(BPE_GZ, "rb").read()).hexdigest(),
        "max_length": MAX_LENGTH,
        "bos_id": 49406,
        "eos_id": 49407,
        "vocab_size": len(vocab),
    }
    write_case_list(os.path.join(OUT, "reference.json"), header, cases)

    differing = [c for c in cases if "slow_ids" in c]
    print(f"{len(cases)} cases; slow differs from fast on {len(differing)}:")
    for c in differing:
        print(f"  {c['name']}: {c['slow_differs']}")
    oc = [c["name"] for c in cases if "open_clip_ids" in c]
    print(f"open_clip differs from fast on {len(oc)}: {', '.join(oc)}")
    for name in sorted(os.listdir(OUT)):
        print(f"  {name}: {os.path.getsize(os.path.join(OUT, name)):,} bytes")
    if unexpected:
        sys.exit("unexpected slow-vs-fast results:\n  " + "\n  ".join(unexpected))


def _open_clip_version():
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:
        return None


if __name__ == "__main__":
    main()
