//! The fuzz targets' bodies, written once: the libFuzzer targets in `fuzz/fuzz_targets/` and the
//! stable replay test `tests/fuzz_corpus.rs` both include this file (`#[path]`). Each function
//! takes arbitrary bytes, calls the crate's public entry points, and panics only when an
//! invariant fails: bad input must come back as an `Err` with a message, never as a panic, an
//! abort or a runaway allocation.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use archaeclip::clip::config::ClipConfig;
use archaeclip::clip::load;
use archaeclip::clip::preprocess::{self, PreprocessConfig};
use archaeclip::clip::tokenizer::ClipTokenizer;
use archaeclip::error::Error;
use archaeclip::vector::codec::{self, ElementType, Vector};

/// The repository root, whether this file is compiled into the fuzz crate (`fuzz/`) or into the
/// main crate's tests.
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("tests/fixtures").is_dir() {
        here.to_path_buf()
    } else {
        here.parent().expect("fuzz/ has a parent").to_path_buf()
    }
}

/// An error must say something: never an empty message.
fn check_error(e: &Error) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "empty error message: {e:?}");
}

/// `a` printed by `vec_to_json` (six decimals) and parsed back is within rounding of `b`.
fn close(parsed: f32, original: f32) -> bool {
    let (p, o) = (f64::from(parsed), f64::from(original));
    (p - o).abs() <= 1e-6 + o.abs() * 1e-6
}

/// Blob vectors of the three element types: a blob that decodes re-encodes to the same bytes,
/// its JSON form parses back, and the quantizers accept it or say why not.
pub fn vector_blob(data: &[u8]) {
    for element in [ElementType::Float32, ElementType::Int8, ElementType::Bit] {
        let v = match Vector::from_blob(data, element) {
            Ok(v) => v,
            Err(e) => {
                check_error(&e);
                assert!(
                    data.is_empty()
                        || (element == ElementType::Float32 && !data.len().is_multiple_of(4)),
                    "{} blob of {} bytes refused: {e}",
                    element.name(),
                    data.len()
                );
                continue;
            }
        };
        assert_eq!(v.element_type(), element);
        assert_eq!(
            v.to_blob(),
            data,
            "{} blob does not round-trip",
            element.name()
        );
        let expected_dims = match element {
            ElementType::Float32 => data.len() / 4,
            ElementType::Int8 => data.len(),
            ElementType::Bit => data.len() * 8,
        };
        assert_eq!(v.dims(), expected_dims);

        let json = v.to_json();
        assert!(json.starts_with('[') && json.ends_with(']'), "{json}");
        let finite = match &v {
            Vector::Float32(x) => codec::check_finite(x).is_ok(),
            _ => true,
        };
        if finite && v.dims() <= codec::MAX_JSON_DIMENSIONS {
            let parsed = codec::f32_from_json(&json)
                .unwrap_or_else(|e| panic!("vec_to_json output does not parse: {e}: {json}"));
            assert_eq!(parsed.len(), v.dims());
            match &v {
                Vector::Float32(x) => {
                    for (p, o) in parsed.iter().zip(x) {
                        assert!(close(*p, *o), "{o} printed and parsed back as {p}");
                    }
                }
                Vector::Int8(x) => {
                    assert!(parsed.iter().zip(x).all(|(p, o)| *p == f32::from(*o)));
                }
                Vector::Bit(x) => {
                    for (i, p) in parsed.iter().enumerate() {
                        assert_eq!(*p, f32::from((x[i / 8] >> (i % 8)) & 1));
                    }
                }
            }
        }

        match codec::quantize_binary(&v) {
            Ok(b) => {
                assert_eq!(b.dims(), v.dims());
                assert_eq!(b.element_type(), ElementType::Bit);
            }
            Err(e) => {
                check_error(&e);
                assert!(element == ElementType::Bit || v.dims() % 8 != 0);
            }
        }
        if let Vector::Float32(x) = &v {
            assert_eq!(codec::quantize_int8_unit(x).len(), x.len());
        }
    }
}

/// JSON text vectors: accepted ones are non-empty, bounded and finite, survive the blob form
/// bit for bit, and their `vec_to_json` text parses back to the same length and values.
pub fn vector_json(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let v = match codec::f32_from_json(&text) {
        Ok(v) => v,
        Err(e) => return check_error(&e),
    };
    assert!(!v.is_empty() && v.len() <= codec::MAX_JSON_DIMENSIONS);
    codec::check_finite(&v).expect("a parsed JSON vector is finite");
    let back = codec::f32_from_blob(&codec::f32_to_blob(&v)).expect("blob of a parsed vector");
    assert!(back.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
    let json = Vector::Float32(v.clone()).to_json();
    let again = codec::f32_from_json(&json)
        .unwrap_or_else(|e| panic!("vec_to_json output does not parse: {e}: {json}"));
    assert_eq!(again.len(), v.len());
    for (p, o) in again.iter().zip(&v) {
        assert!(close(*p, *o), "{o} printed and parsed back as {p}");
    }
}

/// Checks one preprocessed tensor: 3 x crop x crop, finite, within the normalized range of
/// 8-bit pixels (or 0 padding).
fn check_pixels(px: &[f32], c: &PreprocessConfig) {
    assert_eq!(px.len(), 3 * c.crop_size * c.crop_size);
    for (ch, plane) in px.chunks(c.crop_size * c.crop_size).enumerate() {
        let lo = (0.0 - c.mean[ch]) / c.std[ch];
        let hi = (1.0 - c.mean[ch]) / c.std[ch];
        for &v in plane {
            assert!(v.is_finite(), "non-finite pixel {v}");
            assert!(
                v >= lo - 1e-4 && v <= hi + 1e-4,
                "pixel {v} outside [{lo}, {hi}]"
            );
        }
    }
}

/// Encoded image bytes: decode (bounded), then preprocess at the tiny fixture model's size (32)
/// and at an odd size whose crop is larger than the resized image (zero padding).
pub fn image(data: &[u8]) {
    let standard = PreprocessConfig::standard(32);
    let rgb = match preprocess::decode_rgb_at_least(data, Some(standard.shortest_edge)) {
        Ok(rgb) => rgb,
        Err(e) => return check_error(&e),
    };
    let (w, h) = (u64::from(rgb.width()), u64::from(rgb.height()));
    assert!(w > 0 && h > 0 && w * h <= preprocess::MAX_PIXELS);
    let padded = PreprocessConfig {
        shortest_edge: 5,
        crop_size: 7,
        ..PreprocessConfig::standard(5)
    };
    for c in [&standard, &padded] {
        match preprocess::pixels_from_rgb(&rgb, c) {
            Ok(px) => check_pixels(&px, c),
            Err(e) => check_error(&e),
        }
    }
}

fn bundled_tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| ClipTokenizer::bundled(77).expect("bundled tokenizer"))
}

fn fixture_tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let dir = repo_root().join("tests/fixtures/clip/models/tiny-quickgelu");
        ClipTokenizer::from_dir(&dir, 8)
            .expect("fixture tokenizer.json")
            .expect("fixture has a tokenizer")
    })
}

/// Ids framed by bos/eos, at most `max_len` of them, each below `vocab` (the rows of the
/// model's token embedding).
fn check_ids(ids: &[u32], t: &ClipTokenizer, max_len: usize, vocab: usize) {
    assert!(ids.len() >= 2 && ids.len() <= max_len, "{} ids", ids.len());
    assert_eq!(ids[0], t.bos_id());
    assert_eq!(*ids.last().unwrap(), t.eos_id());
    let beyond = ids.iter().find(|&&id| id as usize >= vocab);
    assert!(
        beyond.is_none(),
        "id {beyond:?} beyond a vocabulary of {vocab}"
    );
}

/// Text through the bundled CLIP vocabulary (max_len 77) and the fixture's tokenizer.json
/// (max_len 8, so truncation is exercised): framed by bos/eos, bounded, ids in the vocabulary.
pub fn tokenizer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for (t, max_len) in [(bundled_tokenizer(), 77), (fixture_tokenizer(), 8)] {
        match t.encode(&text) {
            Ok(ids) => check_ids(&ids, t, max_len, t.vocab_size()),
            Err(e) => check_error(&e),
        }
    }
}

/// The same bytes as `config.json` and as `preprocessor_config.json`: accepted configs are
/// within the documented bounds, errors name the file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match ClipConfig::parse(&text, "config.json") {
        Ok(c) => {
            for t in [&c.text.tower, &c.vision.tower] {
                assert!(t.hidden_size > 0 && t.num_attention_heads > 0);
                assert_eq!(t.hidden_size % t.num_attention_heads, 0);
                assert!(t.num_hidden_layers > 0 && t.intermediate_size > 0);
                assert!(t.layer_norm_eps > 0.0 && t.layer_norm_eps < 1.0);
            }
            assert!(c.text.vocab_size > 0 && c.text.max_position_embeddings >= 2);
            assert!(c.vision.patch_size > 0 && c.vision.image_size % c.vision.patch_size == 0);
            assert!(c.grid() >= 1 && c.projection_dim > 0);
            assert_eq!(c.vision.num_channels, 3);
        }
        Err(e) => {
            check_error(&e);
            assert!(e.to_string().contains("config.json"), "{e}");
        }
    }
    match PreprocessConfig::parse(&text, "preprocessor_config.json") {
        Ok(p) => {
            assert!((1..=4096).contains(&p.shortest_edge) && (1..=4096).contains(&p.crop_size));
            assert!(p.do_resize && p.do_center_crop);
            let numbers = p.mean.iter().chain(&p.std).chain([&p.rescale_factor]);
            for x in numbers {
                assert!(x.is_finite(), "accepted a non-finite setting: {p:?}");
            }
            assert!(!p.std.contains(&0.0));
            if p.crop_size <= 64 && p.shortest_edge <= 64 {
                let rgb = image::RgbImage::from_fn(3, 2, |x, y| {
                    image::Rgb([x as u8 * 90, y as u8 * 200, 255])
                });
                let px = preprocess::pixels_from_rgb(&rgb, &p).expect("preprocess a 3x2 image");
                assert_eq!(px.len(), 3 * p.crop_size * p.crop_size);
                assert!(
                    px.iter().all(|v| v.is_finite()),
                    "non-finite pixels from {p:?}"
                );
            }
        }
        Err(e) => {
            check_error(&e);
            assert!(e.to_string().contains("preprocessor_config.json"), "{e}");
        }
    }
}

/// The files of a model directory, in the order the input gives them, separated by NUL bytes
/// (JSON and merges.txt never contain one). An empty part leaves the file out.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "preprocessor_config.json",
    "modules.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
];

/// A model directory made of fuzzed files (weights made from the config, as `clip_train` does
/// with `init`, so no weights file is needed): `clip::load::open_with` accepts it whole or says
/// what is wrong. With a modules.json, the other files go in `0_CLIPModel/` (the
/// sentence-transformers layout). An accepted directory's parts agree with each other and its
/// tokenizer frames a text within `max_position_embeddings`.
pub fn model_dir(data: &[u8]) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "archaeclip-fuzz-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let sentence_transformers = parts.get(2).is_some_and(|p| !p.is_empty());
    let model = if sentence_transformers {
        root.join("0_CLIPModel")
    } else {
        root.clone()
    };
    std::fs::create_dir_all(&model).expect("temp dir");
    for (name, part) in MODEL_FILES.iter().zip(&parts) {
        if part.is_empty() {
            continue;
        }
        let dir = if *name == "modules.json" {
            &root
        } else {
            &model
        };
        std::fs::write(dir.join(name), part).expect("write a model file");
    }
    let no_weights =
        |_: &ClipConfig| Box::new(HashMap::<String, candle_core::Tensor>::new()) as Box<_>;
    let result = load::open_with(&root, Some(&no_weights));
    let _ = std::fs::remove_dir_all(&root);
    match result {
        Ok(o) => {
            assert_eq!(o.preprocess.crop_size, o.config.vision.image_size);
            assert!(o.tokenizer.vocab_size() <= o.config.text.vocab_size);
            let max_len = o.config.text.max_position_embeddings;
            match o.tokenizer.encode("a photo of an amphora, 3rd century") {
                Ok(ids) => check_ids(&ids, &o.tokenizer, max_len, o.config.text.vocab_size),
                Err(e) => check_error(&e),
            }
        }
        Err(e) => check_error(&e),
    }
}
