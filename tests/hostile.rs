//! Hostile and unusual inputs, each with the exact error it must give (function, argument,
//! reason) or the result it must equal: broken and oversized images, exotic pixel formats,
//! NaN/inf and mismatched vectors, and model directories broken one thing at a time, down to a
//! `pytorch_model.bin` whose pickle asks to run a shell command (nothing may ever run).
//!
//! Most inputs are made here, byte by byte; the few that need an encoder we do not have (a CMYK
//! JPEG, a palette PNG) come from `scripts/make_hostile_fixtures.py` in tests/fixtures/hostile/.
//! `cargo test --release --locked --no-default-features --features static --test hostile`
#![cfg(feature = "static")]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use image::{ImageBuffer, ImageFormat, Rgb, RgbImage};
use rusqlite::types::Value;
use rusqlite::Connection;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/clip/models/tiny-quickgelu")
}

fn hostile(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/hostile").join(name)).unwrap()
}

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/clip/images").join(name)).unwrap()
}

/// A directory of its own under the system's temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("archaeclip-hostile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A connection with the tiny model registered as 'tiny'.
fn db() -> Connection {
    let db = Connection::open_in_memory().unwrap();
    archaeclip::register(&db).unwrap();
    db.execute(
        "INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)",
        [tiny().to_str().unwrap()],
    )
    .unwrap();
    db
}

fn error_of(db: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
    match db.query_row(sql, params, |r| r.get::<_, Value>(0)) {
        Ok(v) => panic!("expected an error from {sql}, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(message: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(
            message.contains(f),
            "error {message:?} should contain {f:?}"
        );
    }
}

fn image_error(db: &Connection, bytes: &[u8]) -> String {
    error_of(db, "SELECT clip_embed_image(?, 'tiny')", [bytes])
}

fn embed(db: &Connection, bytes: &[u8]) -> Vec<f32> {
    let blob: Vec<u8> = db
        .query_row("SELECT clip_embed_image(?, 'tiny')", [bytes], |r| r.get(0))
        .unwrap_or_else(|e| panic!("embedding failed: {e}"));
    blob.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn encode<P, C>(img: &ImageBuffer<P, C>, format: ImageFormat) -> Vec<u8>
where
    P: image::Pixel + image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A deterministic 48 x 40 picture with gradients and a block: enough structure for the model.
fn picture() -> RgbImage {
    RgbImage::from_fn(48, 40, |x, y| {
        let block = (12..30).contains(&x) && (8..22).contains(&y);
        Rgb([
            (x * 5) as u8,
            if block { 230 } else { (y * 6) as u8 },
            ((x + y) * 3) as u8,
        ])
    })
}

/// A PNG chunk: length, type, data, CRC over type and data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out
}

/// A GIF of `frames` 1 x 1 frames (palette: red, blue); every frame is pixel 0, red.
fn gif_1x1(frames: usize) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // 1 x 1 screen, 2-colour global table
    out.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
    for _ in 0..frames {
        out.extend_from_slice(&[0x21, 0xF9, 4, 0, 1, 0, 0, 0]); // graphic control: 1/100 s
        out.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // image descriptor 1 x 1
        out.extend_from_slice(&[2, 2, 0x44, 0x01, 0]); // LZW: clear, 0, end
    }
    out.push(0x3B);
    out
}

// ---------------------------------------------------------------------------------------------
// Images

#[test]
fn broken_images_are_clear_errors_naming_function_and_argument() {
    let db = db();
    let prefix = "clip_embed_image(): 1st argument: ";
    let jpeg = photo("photo_astronaut_300x200_q90.jpg");
    let png = encode(&picture(), ImageFormat::Png);
    let webp = photo("webp_lossy_chelsea_128x96_q90.webp");
    let webp_lossless = photo("webp_lossless_coffee_72x96.webp");
    let gif = photo("gif_animated_3frames_rocket_64x48.gif");

    let mut corrupt_jpeg = jpeg.clone();
    // Overwrite the Huffman tables' marker: the decoder meets garbage where a table should be.
    let dht = corrupt_jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC4])
        .unwrap();
    corrupt_jpeg[dht + 4..dht + 40].fill(0xFF);
    let mut corrupt_png = png.clone();
    let idat = corrupt_png.windows(4).position(|w| w == b"IDAT").unwrap();
    corrupt_png[idat + 6] ^= 0x5A; // inside the compressed data: the CRC no longer matches
    let mut corrupt_webp = webp.clone();
    corrupt_webp[20..60].fill(0);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty blob", Vec::new(), "empty image (0 bytes)"),
        (
            "random bytes",
            vec![0, 1, 2, 3, 4, 5, 6, 7],
            "not a recognised image format",
        ),
        (
            "JPEG signature only",
            jpeg[..10].to_vec(),
            "cannot decode the image (corrupt or truncated?)",
        ),
        (
            "JPEG cut after its headers",
            jpeg[..jpeg.len() / 2].to_vec(),
            "cannot decode the image (corrupt or truncated?)",
        ),
        (
            "JPEG with a corrupt Huffman table",
            corrupt_jpeg,
            "cannot decode the image (corrupt or truncated?)",
        ),
        (
            "PNG cut in the middle",
            png[..png.len() / 2].to_vec(),
            "cannot decode the image (corrupt or truncated?)",
        ),
        (
            "PNG with a bad CRC",
            corrupt_png,
            "cannot decode the image (corrupt or truncated?)",
        ),
        (
            "lossy WebP cut in the middle",
            webp[..webp.len() / 2].to_vec(),
            "cannot decode the image",
        ),
        (
            "lossless WebP cut in the middle",
            webp_lossless[..webp_lossless.len() / 2].to_vec(),
            "cannot decode the image",
        ),
        (
            "WebP with zeroed data",
            corrupt_webp,
            "cannot decode the image",
        ),
        (
            // Inside the first frame's pixel data (the global palette ends at byte 781).
            "GIF cut in its first frame",
            gif[..1000].to_vec(),
            "cannot decode the image",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, bytes, reason) in cases {
        match db.query_row("SELECT clip_embed_image(?, 'tiny')", [&bytes], |r| {
            r.get::<_, Value>(0)
        }) {
            Ok(_) => wrong.push(format!("{what}: embedded without an error")),
            Err(e) if e.to_string().starts_with(prefix) && e.to_string().contains(reason) => {}
            Err(e) => wrong.push(format!("{what}: {e:?} should be {prefix}...{reason}")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The connection is still fine afterwards.
    assert_eq!(embed(&db, &png).len(), 12);
}

#[test]
fn a_text_file_named_jpg_and_a_directory_are_refused() {
    let dir = Scratch::new("textjpg");
    let fake = dir.0.join("photo.jpg");
    std::fs::write(&fake, "this is a text file, not a JPEG\n").unwrap();
    let db = db();
    let e = error_of(
        &db,
        "SELECT clip_embed_image(?, 'tiny')",
        [fake.to_str().unwrap()],
    );
    assert_has(
        &e,
        &[
            "clip_embed_image(): 1st argument: ",
            "not a recognised image format",
        ],
    );
    let e = error_of(
        &db,
        "SELECT clip_embed_image(?, 'tiny')",
        [dir.0.to_str().unwrap()],
    );
    assert_has(
        &e,
        &["clip_embed_image(): 1st argument: ", "not a regular file"],
    );
}

#[test]
fn tiny_files_declaring_huge_images_are_refused_before_decoding() {
    let db = db();
    let limit = "is larger than the limit of 64000000 pixels";
    // PNG: a valid IHDR for 50,000 x 50,000 RGB, then IEND (57 bytes in all).
    let mut ihdr = 50_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    // The decoder reads the header up to the first IDAT: one holding a few zero rows' worth.
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &[0; 64]).unwrap();
    png.extend(png_chunk(b"IDAT", &z.finish().unwrap()));
    png.extend(png_chunk(b"IEND", &[]));
    // GIF: a 50,000 x 50,000 screen and frame.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&50_000u16.to_le_bytes());
    gif.extend_from_slice(&50_000u16.to_le_bytes());
    gif.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    gif.extend_from_slice(&[0x2C, 0, 0, 0, 0]);
    gif.extend_from_slice(&50_000u16.to_le_bytes());
    gif.extend_from_slice(&50_000u16.to_le_bytes());
    gif.extend_from_slice(&[0, 2, 2, 0x44, 0x01, 0, 0x3B]);
    // JPEG: a real one whose frame header (SOF0) is patched to 50,000 x 50,000.
    let mut jpeg = photo("photo_astronaut_300x200_q90.jpg");
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 7].copy_from_slice(&50_000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&50_000u16.to_be_bytes());
    // BMP: a 54-byte header for 50,000 x 50,000 at 24 bits.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&54u32.to_le_bytes()); // file size (a lie)
    bmp.extend_from_slice(&[0; 4]);
    bmp.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    bmp.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
    bmp.extend_from_slice(&50_000i32.to_le_bytes());
    bmp.extend_from_slice(&50_000i32.to_le_bytes());
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    bmp.extend_from_slice(&[0; 24]);
    // Lossless WebP (VP8L): 16,383 x 16,383 (268 megapixels). (16,384, the format's largest,
    // wraps to 0 in the image-webp decoder and is refused as "0 x 0 pixels".)
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&(4u32 + 8 + 6).to_le_bytes());
    webp.extend_from_slice(b"WEBPVP8L");
    webp.extend_from_slice(&6u32.to_le_bytes());
    webp.push(0x2F);
    webp.extend_from_slice(&(16_382u32 | (16_382 << 14)).to_le_bytes());
    webp.push(0);
    // Extended WebP (VP8X): a 50,000 x 50,000 canvas (24-bit sizes) around a 1 x 1 VP8L image.
    let mut webp_x = b"RIFF".to_vec();
    webp_x.extend_from_slice(&(4u32 + 18 + 14).to_le_bytes());
    webp_x.extend_from_slice(b"WEBPVP8X");
    webp_x.extend_from_slice(&10u32.to_le_bytes());
    webp_x.extend_from_slice(&[0; 4]);
    webp_x.extend_from_slice(&49_999u32.to_le_bytes()[..3]);
    webp_x.extend_from_slice(&49_999u32.to_le_bytes()[..3]);
    webp_x.extend_from_slice(b"VP8L");
    webp_x.extend_from_slice(&5u32.to_le_bytes());
    webp_x.extend_from_slice(&[0x2F, 0, 0, 0, 0, 0]); // 1 x 1, padded to an even size

    for (what, bytes, size) in [
        ("PNG", png, "50000 x 50000"),
        ("GIF", gif, "50000 x 50000"),
        ("JPEG", jpeg, "50000 x 50000"),
        ("BMP", bmp, "50000 x 50000"),
        ("WebP (VP8L)", webp, "16383 x 16383"),
        ("WebP (VP8X)", webp_x, "50000 x 50000"),
    ] {
        assert!(bytes.len() < 100_000, "{what}: the file itself is tiny");
        let started = Instant::now();
        let e = image_error(&db, &bytes);
        assert!(
            e.starts_with("clip_embed_image(): 1st argument: image of ")
                && e.contains(size)
                && e.contains(limit),
            "{what}: {e:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: refused from the header, not after decoding"
        );
    }
    // More bytes than the limit are refused without looking at them.
    let big = vec![0u8; archaeclip::clip::preprocess::MAX_BYTES + 1];
    assert_has(
        &image_error(&db, &big),
        &[
            "clip_embed_image(): 1st argument: ",
            "bytes is larger than the limit of 67108864 bytes",
        ],
    );
}

#[test]
fn a_gif_with_thousands_of_frames_embeds_its_first_frame_quickly() {
    let db = db();
    let many = gif_1x1(5_000);
    assert!(many.len() < 120_000);
    let started = Instant::now();
    let got = embed(&db, &many);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "only the first frame is decoded: took {elapsed:?}"
    );
    // Same as the one-frame GIF and as a 1 x 1 red PNG: exactly.
    assert_eq!(got, embed(&db, &gif_1x1(1)));
    let red = RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]));
    assert_eq!(got, embed(&db, &encode(&red, ImageFormat::Png)));
}

#[test]
fn unusual_pixel_formats_embed_like_their_8_bit_rgb_equivalent() {
    let db = db();
    let rgb = picture();
    let reference = embed(&db, &encode(&rgb, ImageFormat::Png));

    // Exact conversions: the same pixels after RGB conversion, so the same embedding.
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            let p = rgb.get_pixel(x, y).0;
            Rgb(p.map(|c| u16::from(c) * 257))
        });
    let rgba: ImageBuffer<image::Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            image::Rgba([r, g, b, 255])
        });
    assert_eq!(
        embed(&db, &encode(&rgb16, ImageFormat::Png)),
        reference,
        "16-bit RGB PNG"
    );
    assert_eq!(
        embed(&db, &encode(&rgba, ImageFormat::Png)),
        reference,
        "opaque RGBA PNG"
    );
    assert_eq!(
        embed(&db, &encode(&rgb, ImageFormat::Tiff)),
        reference,
        "TIFF"
    );
    assert_eq!(
        embed(&db, &encode(&rgb, ImageFormat::Bmp)),
        reference,
        "BMP"
    );

    // Grayscale (8 and 16 bits, with alpha) against the gray picture as RGB.
    let gray = image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    let gray_as_rgb = RgbImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let l = gray.get_pixel(x, y).0[0];
        Rgb([l, l, l])
    });
    let gray_reference = embed(&db, &encode(&gray_as_rgb, ImageFormat::Png));
    let gray16: ImageBuffer<image::Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(gray.width(), gray.height(), |x, y| {
            image::Luma([u16::from(gray.get_pixel(x, y).0[0]) * 257])
        });
    let gray_alpha: ImageBuffer<image::LumaA<u8>, Vec<u8>> =
        ImageBuffer::from_fn(gray.width(), gray.height(), |x, y| {
            image::LumaA([gray.get_pixel(x, y).0[0], 255])
        });
    for (what, bytes) in [
        ("8-bit gray PNG", encode(&gray, ImageFormat::Png)),
        ("16-bit gray PNG", encode(&gray16, ImageFormat::Png)),
        ("gray + alpha PNG", encode(&gray_alpha, ImageFormat::Png)),
    ] {
        assert_eq!(embed(&db, &bytes), gray_reference, "{what}");
    }
    // A different picture is told apart (so the equalities above are not trivially true).
    assert_ne!(gray_reference, reference);

    // From the generator (Pillow): a palette PNG and a palette + transparency PNG of the same
    // picture (exact), and CMYK JPEGs (Pillow's naive RGB -> CMYK, Adobe-inverted as Photoshop
    // writes them) against the RGB JPEG at the same quality and against the lossless source.
    let source = hostile("source_rgb.png");
    let source_embedding = embed(&db, &source);
    assert_eq!(
        embed(&db, &hostile("palette.png")),
        source_embedding,
        "palette PNG"
    );
    assert_eq!(
        embed(&db, &hostile("palette_trns.png")),
        source_embedding,
        "palette PNG with a transparent index"
    );
    let rgb_jpeg = embed(&db, &hostile("rgb_q95.jpg"));
    let cmyk_jpeg = embed(&db, &hostile("cmyk_q95.jpg"));
    for (what, other, min) in [
        ("CMYK vs RGB JPEG", &rgb_jpeg, 0.99),
        ("CMYK JPEG vs lossless source", &source_embedding, 0.99),
    ] {
        let c = cosine(&cmyk_jpeg, other);
        assert!(c >= min, "{what}: cosine {c}");
    }
    // The CMYK pixels are the RGB picture's: within JPEG's loss of the source, channel order
    // and polarity right (a swapped or inverted channel would be off by ~100 levels).
    let decoded = archaeclip::clip::preprocess::decode_rgb(&hostile("cmyk_q95.jpg")).unwrap();
    let want = archaeclip::clip::preprocess::decode_rgb(&source).unwrap();
    let mean_diff = decoded
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / want.as_raw().len() as f64;
    assert!(
        mean_diff < 4.0,
        "CMYK JPEG decodes to the source picture: mean difference {mean_diff} levels"
    );
}

// ---------------------------------------------------------------------------------------------
// Vectors

#[test]
fn nan_inf_and_mismatched_vectors_are_errors_in_search_and_aggregates() {
    let db = db();
    let nan = f32::NAN.to_le_bytes();
    let inf = f32::INFINITY.to_le_bytes();
    let one = 1f32.to_le_bytes();
    let blob = |parts: &[[u8; 4]]| parts.concat();
    db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, e BLOB)")
        .unwrap();
    let insert = |id: i64, v: Vec<u8>| {
        db.execute("INSERT INTO t VALUES (?, ?)", rusqlite::params![id, v])
            .unwrap();
    };
    insert(1, blob(&[one, one]));
    insert(2, blob(&[one, nan]));
    insert(3, blob(&[inf, one]));
    insert(4, blob(&[one, one, one]));

    // The query.
    for (q, index) in [(blob(&[nan, one]), 0), (blob(&[one, inf]), 1)] {
        let e = error_of(
            &db,
            "SELECT id FROM clip_search(?, 1, 'SELECT id, e FROM t WHERE id = 1')",
            [q],
        );
        assert_eq!(
            e,
            format!(
                "clip_search(): 1st argument: element {index} is NaN or infinite; vectors must be finite"
            )
        );
    }
    // A row, named by its id, on every path: streamed (first use), copied (second use), and
    // scanned from the copy (third): the copy must not be kept with a bad row in it.
    for (filter, id, index) in [("id IN (1, 2)", 2, 1), ("id IN (1, 3)", 3, 0)] {
        let sql = format!(
            "SELECT id FROM clip_search('[1, 0]', 1, 'SELECT id, e FROM t WHERE {filter}')"
        );
        for attempt in 0..3 {
            assert_eq!(
                error_of(&db, &sql, []),
                format!(
                    "clip_search(): 3rd argument: row with id {id}: element {index} is NaN or infinite; vectors must be finite"
                ),
                "attempt {attempt}"
            );
        }
    }
    // Mismatched dimensions, in every metric.
    for metric in ["cosine", "dot", "l2"] {
        let sql = format!(
            "SELECT id FROM clip_search('[1, 0]', 1, 'SELECT id, e FROM t WHERE id IN (1, 4)', '{metric}')"
        );
        for _ in 0..3 {
            assert_has(
                &error_of(&db, &sql, []),
                &["clip_search(): 3rd argument: row with id 4: dimension mismatch: 2 vs 3"],
            );
        }
    }
    // The aggregate and the scalar functions.
    let e = error_of(&db, "SELECT vec_avg(e) FROM t WHERE id IN (1, 2)", []);
    assert_has(
        &e,
        &["vec_avg(): 1st argument: element 1 is NaN or infinite"],
    );
    let e = error_of(&db, "SELECT vec_avg(e) FROM t WHERE id IN (1, 4)", []);
    assert_has(&e, &["vec_avg(): 1st argument: dimension mismatch: 2 vs 3"]);
    for f in [
        "vec_cosine",
        "vec_dot",
        "vec_distance_l2",
        "vec_distance_cosine",
    ] {
        let e = error_of(
            &db,
            &format!("SELECT {f}((SELECT e FROM t WHERE id = 1), (SELECT e FROM t WHERE id = 3))"),
            [],
        );
        assert_eq!(
            e,
            format!("{f}(): 2nd argument: element 0 is NaN or infinite; vectors must be finite")
        );
        let e = error_of(
            &db,
            &format!("SELECT {f}((SELECT e FROM t WHERE id = 1), (SELECT e FROM t WHERE id = 4))"),
            [],
        );
        assert_has(
            &e,
            &[&format!("{f}(): 2nd argument: dimension mismatch: 2 vs 3")],
        );
    }
    // JSON beyond float32's range, and NaN spelled out (not JSON).
    assert_has(
        &error_of(&db, "SELECT vec_length('[1, -1e39]')", []),
        &["vec_length(): 1st argument: element 1 is NaN or infinite"],
    );
    assert_has(
        &error_of(&db, "SELECT vec_length('[1, NaN]')", []),
        &["vec_length(): 1st argument: invalid JSON vector"],
    );
}

// ---------------------------------------------------------------------------------------------
// Model directories

/// A copy of the tiny model in a scratch directory, to break.
fn model_copy(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.0.join(entry.file_name())).unwrap();
    }
    dir
}

/// The error of embedding a text with the model in `dir`.
fn model_error(dir: &Path) -> String {
    let db = Connection::open_in_memory().unwrap();
    archaeclip::register(&db).unwrap();
    db.execute(
        "INSERT INTO temp.clip_models(name, path) VALUES ('broken', ?)",
        [dir.to_str().unwrap()],
    )
    .unwrap();
    let e = error_of(&db, "SELECT clip_embed_text('a coin', 'broken')", []);
    assert!(
        e.starts_with("clip_embed_text(): model 'broken': "),
        "names the function and the model: {e:?}"
    );
    // One line: no backtrace appended when RUST_BACKTRACE is set.
    assert!(!e.contains('\n'), "{e:?}");
    // The same error from the other functions, each naming itself.
    let e2 = error_of(&db, "SELECT clip_model_info('broken')", []);
    assert!(
        e2.starts_with("clip_model_info(): model 'broken': "),
        "{e2:?}"
    );
    e
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn absurd_config_sizes_are_refused_naming_the_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/text_config/hidden_size",
            serde_json::json!(1_000_000_000_000u64),
            "config.json: text_config: hidden_size 1000000000000 / intermediate_size 40 out of range",
        ),
        (
            "/vision_config/num_hidden_layers",
            serde_json::json!(1_000_000_000),
            "config.json: vision_config: num_hidden_layers 1000000000 out of range 1..256",
        ),
        (
            "/text_config/num_hidden_layers",
            serde_json::json!(-3),
            "config.json: text_config: invalid value: integer `-3`, expected usize",
        ),
        (
            "/text_config/hidden_size",
            serde_json::json!(1e30),
            "config.json: text_config: invalid type: floating point",
        ),
        (
            "/vision_config/intermediate_size",
            serde_json::json!(0),
            "config.json: vision_config: hidden_size 20 / intermediate_size 0 out of range",
        ),
        (
            "/text_config/vocab_size",
            serde_json::json!(1u64 << 40),
            "config.json: text_config: vocab_size 1099511627776 out of range",
        ),
        (
            "/text_config/max_position_embeddings",
            serde_json::json!(1_000_000),
            "config.json: text_config: max_position_embeddings 1000000 out of range",
        ),
        (
            "/vision_config/image_size",
            serde_json::json!(1_000_000),
            "config.json: vision_config: image_size 1000000 must be a multiple of patch_size 8 (and at most 4096)",
        ),
        (
            "/vision_config/patch_size",
            serde_json::json!(0),
            "config.json: vision_config: image_size 32 must be a multiple of patch_size 0",
        ),
        (
            "/projection_dim",
            serde_json::json!(1u64 << 33),
            "config.json: projection_dim 8589934592 out of range",
        ),
        (
            "/vision_config/layer_norm_eps",
            serde_json::json!(-1.0),
            "config.json: vision_config: layer_norm_eps -1 out of range",
        ),
        (
            "/text_config/num_attention_heads",
            serde_json::json!(0),
            "config.json: text_config: hidden_size 16 is not divisible by num_attention_heads 0",
        ),
    ];
    for (i, (pointer, value, want)) in cases.into_iter().enumerate() {
        let dir = model_copy(&format!("config{i}"));
        edit_config(&dir.0, |c| *c.pointer_mut(pointer).unwrap() = value.clone());
        let e = model_error(&dir.0);
        assert!(e.contains(want), "{pointer} = {value}: {e:?}");
    }
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn weights_with_a_wrong_shape_or_missing_name_the_tensor() {
    let name = "text_model.embeddings.position_embedding.weight";
    let dir = model_copy("shape");
    let mut t = tensors(&dir.0);
    t.insert(
        name.into(),
        Tensor::zeros((76, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.0.join("model.safetensors")).unwrap();
    assert_has(
        &model_error(&dir.0),
        &[
            "the weights do not match config.json",
            name,
            "[76, 16]",
            "[77, 16]",
        ],
    );

    let dir = model_copy("missing");
    let mut t = tensors(&dir.0);
    t.remove("vision_model.post_layernorm.weight");
    candle_core::safetensors::save(&t, dir.0.join("model.safetensors")).unwrap();
    assert_has(
        &model_error(&dir.0),
        &[
            "the weights do not match config.json",
            "vision_model.post_layernorm.weight",
        ],
    );

    // A config that asks for one more layer than the weights hold.
    let dir = model_copy("layers");
    edit_config(&dir.0, |c| c["text_config"]["num_hidden_layers"] = 3.into());
    assert_has(
        &model_error(&dir.0),
        &[
            "the weights do not match config.json",
            "text_model.encoder.layers.2.",
        ],
    );
}

#[test]
fn truncated_and_lying_safetensors_files_are_refused() {
    let original = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", Vec::new()),
        ("cut inside the length", original[..5].to_vec()),
        (
            "cut inside the header",
            original[..8 + header_len / 2].to_vec(),
        ),
        (
            "cut inside the data",
            original[..original.len() - 100].to_vec(),
        ),
        ("a header claiming 1 TiB", {
            let mut b = original.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("a header claiming u64::MAX", {
            let mut b = original.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("a header that is not JSON", {
            let mut b = original.clone();
            b[8..8 + 16].fill(b'#');
            b
        }),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let dir = model_copy(&format!("st{i}"));
        std::fs::write(dir.0.join("model.safetensors"), &bytes).unwrap();
        let e = model_error(&dir.0);
        assert!(
            e.contains("cannot read the safetensors weights: "),
            "{what}: {e:?}"
        );
    }
    // A header whose offsets point past the end of the data.
    let dir = model_copy("offsets");
    let header = std::str::from_utf8(&original[8..8 + header_len]).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(header).unwrap();
    let last_end = json
        .as_object()
        .unwrap()
        .values()
        .filter_map(|t| t["data_offsets"][1].as_u64())
        .max()
        .unwrap();
    let key = json
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, t)| t["data_offsets"][1].as_u64() == Some(last_end))
        .map(|(k, _)| k.clone())
        .unwrap();
    json[&key]["data_offsets"][1] = (last_end + (1 << 30)).into();
    let mut header = json.to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    bytes.extend(&original[8 + header_len..]);
    std::fs::write(dir.0.join("model.safetensors"), &bytes).unwrap();
    assert_has(
        &model_error(&dir.0),
        &["cannot read the safetensors weights: "],
    );
}

// ---------------------------------------------------------------------------------------------
// pytorch_model.bin: pickles that ask to run code, and pickles that lie

/// A zip archive of stored (uncompressed) entries, as torch.save writes them.
fn zip_stored(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let offset = out.len() as u32;
        let mut fields = Vec::new();
        fields.extend_from_slice(&20u16.to_le_bytes()); // version needed
        fields.extend_from_slice(&0u16.to_le_bytes()); // flags
        fields.extend_from_slice(&0u16.to_le_bytes()); // stored
        fields.extend_from_slice(&0u32.to_le_bytes()); // time and date
        fields.extend_from_slice(&crc.sum().to_le_bytes());
        fields.extend_from_slice(&(data.len() as u32).to_le_bytes());
        fields.extend_from_slice(&(data.len() as u32).to_le_bytes());
        fields.extend_from_slice(&(name.len() as u16).to_le_bytes());
        fields.extend_from_slice(&0u16.to_le_bytes()); // extra
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&fields);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&fields);
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Pickle opcodes, protocol 2.
mod pk {
    pub fn unicode(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out
    }
    pub fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }
    pub fn int(i: i32) -> Vec<u8> {
        let mut out = vec![b'J'];
        out.extend_from_slice(&i.to_le_bytes());
        out
    }
    /// `callable(*args)`, as pickle spells a call: GLOBAL, MARK, args, TUPLE, REDUCE.
    pub fn call(module: &str, name: &str, args: &[Vec<u8>]) -> Vec<u8> {
        let mut out = global(module, name);
        out.push(b'(');
        out.extend(args.concat());
        out.extend_from_slice(b"tR");
        out
    }
    pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![b'('];
        out.extend(items.concat());
        out.push(b't');
        out
    }
    /// A whole pickle: PROTO 2, the body, STOP.
    pub fn pickle(body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![0x80, 2];
        out.extend(body);
        out.push(b'.');
        out
    }
    /// `{key: value}`.
    pub fn dict(items: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![b'}'];
        for (k, v) in items {
            out.extend(unicode(k));
            out.extend_from_slice(v);
            out.push(b's');
        }
        out
    }
    /// torch's `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` with a
    /// float storage of `numel` elements in `archive/data/0`.
    pub fn tensor(numel: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
        let mut storage = tuple(&[
            unicode("storage"),
            global("torch", "FloatStorage"),
            unicode("0"),
            unicode("cpu"),
            int(numel),
        ]);
        storage.push(b'Q'); // BINPERSID
        call(
            "torch._utils",
            "_rebuild_tensor_v2",
            &[
                storage,
                int(0),
                tuple(&size.iter().map(|&s| int(s)).collect::<Vec<_>>()),
                tuple(&stride.iter().map(|&s| int(s)).collect::<Vec<_>>()),
                vec![0x89], // False
                call("collections", "OrderedDict", &[]),
            ],
        )
    }
}

/// A model directory whose only weights are `pytorch_model.bin` with these bytes.
fn pth_model(name: &str, bin: &[u8]) -> Scratch {
    let dir = model_copy(name);
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    std::fs::write(dir.0.join("pytorch_model.bin"), bin).unwrap();
    dir
}

#[test]
fn a_pickle_that_calls_os_system_runs_nothing_and_is_a_clear_error() {
    let marker =
        std::env::temp_dir().join(format!("archaeclip-hostile-{}-pwned", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let command = format!("touch {}", marker.display());
    let system = |module: &str| pk::call(module, "system", &[pk::unicode(&command)]);
    let exec = pk::call(
        "builtins",
        "exec",
        &[pk::unicode(&format!(
            "open('{}', 'w').write('pwned')",
            marker.display()
        ))],
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "torch format, the whole pickle is os.system(...)",
            zip_stored(&[("archive/data.pkl", &pk::pickle(system("os")))]),
            "pytorch_model.bin holds no tensors",
        ),
        (
            "torch format, posix.system inside the state dict",
            zip_stored(&[(
                "archive/data.pkl",
                &pk::pickle(pk::dict(&[(
                    "text_model.embeddings.token_embedding.weight",
                    system("posix"),
                )])),
            )]),
            "pytorch_model.bin holds no tensors",
        ),
        (
            "torch format, builtins.exec",
            zip_stored(&[("archive/data.pkl", &pk::pickle(exec.clone()))]),
            "pytorch_model.bin holds no tensors",
        ),
        (
            "a raw pickle (the legacy format), os.system",
            pk::pickle(system("os")),
            "cannot read pytorch_model.bin: ",
        ),
        (
            "torch format, _rebuild_tensor_v2 with too few arguments",
            zip_stored(&[(
                "archive/data.pkl",
                &pk::pickle(pk::dict(&[(
                    "logit_scale",
                    pk::call("torch._utils", "_rebuild_tensor_v2", &[pk::int(1)]),
                )])),
            )]),
            "cannot read pytorch_model.bin: ",
        ),
        (
            "torch format, _rebuild_from_type_v2 with one argument",
            zip_stored(&[(
                "archive/data.pkl",
                &pk::pickle(pk::dict(&[(
                    "logit_scale",
                    pk::call("torch._tensor", "_rebuild_from_type_v2", &[pk::int(1)]),
                )])),
            )]),
            "cannot read pytorch_model.bin: ",
        ),
        (
            "torch format, a tensor claiming 2^31 x 2^31 floats in a 4-byte storage",
            zip_stored(&[
                (
                    "archive/data.pkl",
                    &pk::pickle(pk::dict(&[(
                        "logit_scale",
                        pk::tensor(1, &[i32::MAX, i32::MAX], &[i32::MAX, 1]),
                    )])),
                ),
                ("archive/data/0", &[0, 0, 0, 0]),
            ]),
            "pytorch_model.bin: tensor 'logit_scale'",
        ),
        (
            "torch format, a tensor claiming 2^34 floats (64 GiB) in a 4-byte storage",
            zip_stored(&[
                (
                    "archive/data.pkl",
                    &pk::pickle(pk::dict(&[(
                        "logit_scale",
                        pk::tensor(1, &[1 << 17, 1 << 17], &[1 << 17, 1]),
                    )])),
                ),
                ("archive/data/0", &[0, 0, 0, 0]),
            ]),
            "pytorch_model.bin: tensor 'logit_scale'",
        ),
        (
            "a zip without data.pkl",
            zip_stored(&[("archive/version", b"3\n")]),
            "pytorch_model.bin holds no tensors",
        ),
        (
            "unknown opcode",
            zip_stored(&[("archive/data.pkl", &[0x80, 2, 0xFF, b'.'])]),
            "cannot read pytorch_model.bin: ",
        ),
    ];
    for (i, (what, bin, want)) in cases.into_iter().enumerate() {
        let dir = pth_model(&format!("pickle{i}"), &bin);
        let e = model_error(&dir.0);
        assert!(e.contains(want), "{what}: {e:?}");
        assert!(
            !e.contains("internal error"),
            "{what}: a clear error, not a caught panic: {e:?}"
        );
        assert!(!marker.exists(), "{what}: the pickle ran a command");
    }
    // And the same through the training loader, which opens the weights itself.
    let dir = pth_model(
        "pickle-train",
        &zip_stored(&[("archive/data.pkl", &pk::pickle(system("os")))]),
    );
    let e = match archaeclip::clip::load::open(&dir.0) {
        Ok(_) => panic!("opened a model without tensors"),
        Err(e) => e.to_string(),
    };
    assert_has(&e, &["pytorch_model.bin holds no tensors"]);
    assert!(!marker.exists(), "the pickle ran a command");
}

#[test]
fn candle_errors_lose_their_backtrace_in_messages() {
    let inner = candle_core::Error::Msg("shape mismatch for w".into());
    let e = candle_core::Error::WithBacktrace {
        inner: Box::new(inner),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    }
    .context("loading");
    assert!(
        e.to_string().lines().count() > 2,
        "candle appends the frames"
    );
    assert_eq!(
        archaeclip::clip::candle_message(&e),
        "loading: shape mismatch for w"
    );
}
