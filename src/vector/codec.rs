//! Vector formats. Float32 vectors are little-endian blobs with no header (the format of `llm`'s
//! `embeddings.db` and of sqlite-vec); JSON text (`'[0.1, -2, 3e-1]'`) is accepted wherever a
//! vector is. int8 and bit vectors are the outputs of the quantizers; they travel as blobs tagged
//! with sqlite-vec's subtypes, so `vec_length(vec_quantize_int8(v, 'unit'))` works as it does there.

use std::fmt::{self, Write as _};

use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::error::{Error, Result};

/// Most dimensions a JSON vector may have. CLIP models use 512-1024; sqlite-vec's vec0 allows
/// 8192. The cap keeps a hostile `'[0,0,0,...]'` from allocating without bound.
pub const MAX_JSON_DIMENSIONS: usize = 65_536;

/// The element type of a vector, with sqlite-vec's subtype numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    Float32,
    Int8,
    Bit,
}

/// The subtype SQLite's JSON functions give JSON text; `vec_to_json` sets it too, so that
/// `json_object('v', vec_to_json(e))` nests the array instead of quoting it.
pub const JSON_SUBTYPE: u32 = 74;

impl ElementType {
    /// sqlite-vec's subtype for values of this type (`SQLITE_VEC_ELEMENT_TYPE_*`).
    pub const fn subtype(self) -> u32 {
        match self {
            ElementType::Float32 => 223,
            ElementType::Bit => 224,
            ElementType::Int8 => 225,
        }
    }

    /// The element type a subtype denotes; untagged blobs are float32.
    pub const fn from_subtype(subtype: u32) -> ElementType {
        match subtype {
            224 => ElementType::Bit,
            225 => ElementType::Int8,
            _ => ElementType::Float32,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ElementType::Float32 => "float32",
            ElementType::Int8 => "int8",
            ElementType::Bit => "bit",
        }
    }
}

/// An owned vector of one of the three element types.
#[derive(Debug, Clone, PartialEq)]
pub enum Vector {
    Float32(Vec<f32>),
    Int8(Vec<i8>),
    /// Packed bits, element `i` in byte `i / 8`, bit `i % 8` (least significant first).
    Bit(Vec<u8>),
}

impl Vector {
    pub fn element_type(&self) -> ElementType {
        match self {
            Vector::Float32(_) => ElementType::Float32,
            Vector::Int8(_) => ElementType::Int8,
            Vector::Bit(_) => ElementType::Bit,
        }
    }

    /// Number of dimensions (bits, for a bit vector).
    pub fn dims(&self) -> usize {
        match self {
            Vector::Float32(v) => v.len(),
            Vector::Int8(v) => v.len(),
            Vector::Bit(v) => v.len() * 8,
        }
    }

    /// The blob form: little-endian float32, raw int8 bytes, or packed bits.
    pub fn to_blob(&self) -> Vec<u8> {
        match self {
            Vector::Float32(v) => f32_to_blob(v),
            Vector::Int8(v) => v.iter().map(|&x| x as u8).collect(),
            Vector::Bit(v) => v.clone(),
        }
    }

    /// Decodes a blob of the given element type.
    pub fn from_blob(bytes: &[u8], element: ElementType) -> Result<Vector> {
        if bytes.is_empty() {
            return Err(Error::EmptyVector);
        }
        Ok(match element {
            ElementType::Float32 => Vector::Float32(f32_from_blob(bytes)?),
            ElementType::Int8 => Vector::Int8(bytes.iter().map(|&b| b as i8).collect()),
            ElementType::Bit => Vector::Bit(bytes.to_vec()),
        })
    }

    /// JSON text, in sqlite-vec's format: `[0.100000,-2.000000]` for float32 (C's `%f`),
    /// `[1,-128]` for int8 and `[0,1,...]` (one entry per bit) for bit vectors.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.dims() * 10 + 2);
        out.push('[');
        match self {
            Vector::Float32(v) => join(&mut out, v.iter(), |o, x| write_fixed6(o, *x)),
            Vector::Int8(v) => join(&mut out, v.iter(), |o, x| {
                let _ = write!(o, "{x}");
            }),
            Vector::Bit(v) => join(&mut out, 0..v.len() * 8, |o, i| {
                o.push(if v[i / 8] >> (i % 8) & 1 == 1 {
                    '1'
                } else {
                    '0'
                })
            }),
        }
        out.push(']');
        out
    }
}

fn join<T>(out: &mut String, items: impl Iterator<Item = T>, mut each: impl FnMut(&mut String, T)) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        each(out, item);
    }
}

/// SQLite's `printf('%f', x)`, which sqlite-vec uses: six digits after the point, halves rounded
/// away from zero (C rounds them to even), no sign on zero, at most 16 significant digits.
fn write_fixed6(out: &mut String, x: f32) {
    let x = f64::from(x);
    if x.is_nan() {
        out.push_str("null");
    } else if x.is_infinite() {
        out.push_str(if x < 0.0 { "-Inf" } else { "Inf" });
    } else if x == 0.0 {
        out.push_str("0.000000");
    } else if (x * 128.0).fract() == 0.0 && (x * 128.0) % 2.0 != 0.0 && x.abs() < 1e9 {
        // x = m/128 with m odd: x * 1e6 ends in exactly .5, the only ties an f32 can produce.
        // Round the magnitude up, as SQLite does.
        let micros = ((x.abs() * 1e6) + 0.5) as u64;
        let sign = if x < 0.0 { "-" } else { "" };
        let _ = write!(
            out,
            "{sign}{}.{:06}",
            micros / 1_000_000,
            micros % 1_000_000
        );
    } else {
        let text = format!("{x:.6}");
        out.push_str(&limit_significant_digits(&text, 16));
    }
}

/// Zeroes every digit after the first `max` significant ones (SQLite's `%f` precision limit).
fn limit_significant_digits(text: &str, max: usize) -> String {
    let mut seen = 0;
    text.chars()
        .map(|c| {
            if !c.is_ascii_digit() {
                return c;
            }
            if seen == 0 && c == '0' {
                return c;
            }
            seen += 1;
            if seen > max {
                '0'
            } else {
                c
            }
        })
        .collect()
}

/// Little-endian float32 blob -> floats. Any alignment; the length must be a multiple of 4.
pub fn f32_from_blob(bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.is_empty() {
        return Err(Error::EmptyVector);
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::BlobLength { len: bytes.len() });
    }
    let mut v = vec![0.0f32; bytes.len() / 4];
    f32_from_le(bytes, &mut v);
    Ok(v)
}

/// Little-endian float32 bytes into `out` (one copy on a little-endian CPU). `bytes` must be
/// exactly `4 * out.len()` long.
pub fn f32_from_le(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), std::mem::size_of_val(out), "4 bytes per float");
    if cfg!(target_endian = "little") {
        // SAFETY: `out` has exactly `bytes.len()` bytes (asserted), every bit pattern is an
        // f32, and a byte copy needs no alignment of the source.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                out.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        return;
    }
    for (x, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Floats -> little-endian float32 blob.
pub fn f32_to_blob(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Floats as little-endian float32 bytes: the floats' own memory on a little-endian CPU (no
/// copy), a converted copy elsewhere.
pub fn f32_le_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte of it is initialized; u8 needs no
        // alignment; the length covers exactly the floats' bytes, borrowed for as long as `v`.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
        })
    } else {
        std::borrow::Cow::Owned(f32_to_blob(v))
    }
}

/// The first NaN or infinite element, as an error.
pub fn check_finite(v: &[f32]) -> Result<()> {
    // First a pass without an early exit, which vectorizes (every insert checks its vector);
    // the position is looked for only when something is wrong.
    const EXPONENT: u32 = 0x7F80_0000;
    let bad = v.iter().fold(0u32, |bad, x| {
        bad | u32::from(x.to_bits() & EXPONENT == EXPONENT)
    });
    if bad == 0 {
        return Ok(());
    }
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { index }),
        None => Ok(()),
    }
}

/// A JSON array of numbers -> float32. Numbers are parsed exactly to f64 and rounded to f32
/// (as C's `(float)strtod(...)`); a number beyond f32's range is reported, not turned into inf.
pub fn f32_from_json(text: &str) -> Result<Vec<f32>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = de
        .deserialize_seq(FloatArray)
        .map_err(|e| json_error(&e, text))?;
    de.end().map_err(|e| json_error(&e, text))?;
    if v.is_empty() {
        return Err(Error::EmptyVector);
    }
    Ok(v)
}

fn json_error(e: &serde_json::Error, text: &str) -> Error {
    let msg = e.to_string();
    // Our own errors travel through serde's custom-error channel with a marker.
    if let Some(rest) = msg.strip_prefix(TOO_MANY) {
        let found = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(MAX_JSON_DIMENSIONS + 1);
        return Error::TooManyDimensions {
            found,
            max: MAX_JSON_DIMENSIONS,
        };
    }
    if let Some(rest) = msg.strip_prefix(NON_FINITE) {
        let index = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return Error::NonFinite { index };
    }
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Error::Json {
            detail: "empty text, expected an array like [0.1, 0.2]".into(),
        };
    }
    if !trimmed.starts_with('[') {
        return Error::Json {
            detail: "expected an array like [0.1, 0.2]".into(),
        };
    }
    Error::Json { detail: msg }
}

const TOO_MANY: &str = "archaeclip-too-many:";
const NON_FINITE: &str = "archaeclip-non-finite:";

struct FloatArray;

impl<'de> Visitor<'de> for FloatArray {
    type Value = Vec<f32>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers like [0.1, 0.2]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(x) = seq.next_element::<Number>()? {
            if out.len() == MAX_JSON_DIMENSIONS {
                return Err(de::Error::custom(format!(
                    "{TOO_MANY}{} ",
                    MAX_JSON_DIMENSIONS + 1
                )));
            }
            let x = x.0 as f32;
            if !x.is_finite() {
                return Err(de::Error::custom(format!("{NON_FINITE}{} ", out.len())));
            }
            out.push(x);
        }
        Ok(out)
    }
}

/// One array element: a JSON number, nothing else (no strings, nulls, nested arrays).
struct Number(f64);

impl<'de> serde::Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
        }
        d.deserialize_f64(V)
    }
}

/// sqlite-vec's `vec_quantize_int8(v, 'unit')`, bit for bit: `y = (x + 1) / step - 128` in f64
/// with `step = (float)(2 / 255)`, truncated toward zero, saturating at -128 and 127. (So 1.0
/// maps to 126, as there.)
pub fn quantize_int8_unit(v: &[f32]) -> Vec<i8> {
    let step = f64::from(2.0f32 / 255.0);
    v.iter()
        .map(|&x| {
            let y = (f64::from(x) + 1.0) / step - 128.0;
            // NaN and +inf saturate high, as in sqlite-vec.
            if y.is_nan() || y > 127.0 {
                127
            } else if y >= -128.0 {
                y.trunc() as i8
            } else {
                -128
            }
        })
        .collect()
}

/// sqlite-vec's `vec_quantize_binary(v)`: one bit per element, set where the element is > 0.
pub fn quantize_binary(v: &Vector) -> Result<Vector> {
    let dims = v.dims();
    if !dims.is_multiple_of(8) {
        return Err(Error::BitLength { dims });
    }
    let positive: Vec<bool> = match v {
        Vector::Float32(x) => x.iter().map(|&e| e > 0.0).collect(),
        Vector::Int8(x) => x.iter().map(|&e| e > 0).collect(),
        Vector::Bit(_) => {
            return Err(Error::UnsupportedElementType {
                op: "binary quantization",
                element: "bit",
            })
        }
    };
    let mut out = vec![0u8; dims / 8];
    for (i, p) in positive.into_iter().enumerate() {
        if p {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(Vector::Bit(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_errors() {
        assert_eq!(
            f32_from_json(" [ 1 , 2.5 ,-3e-1 ] ").unwrap(),
            vec![1.0, 2.5, -0.3]
        );
        assert_eq!(f32_from_json("[]"), Err(Error::EmptyVector));
        assert!(matches!(f32_from_json("[1,"), Err(Error::Json { .. })));
        assert!(matches!(
            f32_from_json("[1,\"a\"]"),
            Err(Error::Json { .. })
        ));
        assert!(matches!(f32_from_json("[1,null]"), Err(Error::Json { .. })));
        assert!(matches!(f32_from_json("[[1]]"), Err(Error::Json { .. })));
        assert!(matches!(f32_from_json("[1] x"), Err(Error::Json { .. })));
        assert_eq!(
            f32_from_json("[1, 1e39]"),
            Err(Error::NonFinite { index: 1 })
        );
        let big = format!("[{}]", vec!["0"; MAX_JSON_DIMENSIONS + 1].join(","));
        assert_eq!(
            f32_from_json(&big),
            Err(Error::TooManyDimensions {
                found: MAX_JSON_DIMENSIONS + 1,
                max: MAX_JSON_DIMENSIONS
            })
        );
    }

    #[test]
    fn blob_round_trip() {
        let v = vec![1.0f32, -0.5, 3.25];
        assert_eq!(f32_from_blob(&f32_to_blob(&v)).unwrap(), v);
        // The borrowed view is the same bytes as the copy: 1.0 is 0x3F800000, little-endian.
        assert_eq!(f32_le_bytes(&v).as_ref(), f32_to_blob(&v).as_slice());
        assert_eq!(&f32_le_bytes(&v)[..4], &[0, 0, 0x80, 0x3F]);
        // Unaligned bytes read the same.
        let mut shifted = vec![0u8];
        shifted.extend(f32_to_blob(&v));
        assert_eq!(f32_from_blob(&shifted[1..]).unwrap(), v);
        // The first non-finite element is named; the extremes of finite pass.
        let mut long = vec![1.0f32; 40];
        assert_eq!(check_finite(&long), Ok(()));
        long[33] = f32::NAN;
        long[35] = f32::INFINITY;
        assert_eq!(check_finite(&long), Err(Error::NonFinite { index: 33 }));
        assert_eq!(
            check_finite(&[f32::NEG_INFINITY]),
            Err(Error::NonFinite { index: 0 })
        );
        assert_eq!(
            check_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, -0.0]),
            Ok(())
        );
        assert_eq!(
            f32_from_blob(&[0, 0, 128]),
            Err(Error::BlobLength { len: 3 })
        );
        assert_eq!(f32_from_blob(&[]), Err(Error::EmptyVector));
    }

    #[test]
    fn json_formatting_matches_printf_f() {
        let v = Vector::Float32(vec![0.1, -2.0, 1.0 / 3.0, 123456789.0, -0.0, -1e-8]);
        assert_eq!(
            v.to_json(),
            "[0.100000,-2.000000,0.333333,123456792.000000,0.000000,-0.000000]"
        );
        // Halves round away from zero, as SQLite's printf does (Rust's {:.6} would give ...062).
        let ties = Vector::Float32(vec![1.0 / 128.0, 5362.0 + 53.0 / 128.0, -3.0 / 128.0]);
        assert_eq!(ties.to_json(), "[0.007813,5362.414063,-0.023438]");
        assert_eq!(
            Vector::Float32(vec![123_456_789_012.0]).to_json(),
            "[123456790528.000000]"
        );
        assert_eq!(Vector::Int8(vec![1, -128]).to_json(), "[1,-128]");
        assert_eq!(
            Vector::Bit(vec![0b0000_0101]).to_json(),
            "[1,0,1,0,0,0,0,0]"
        );
    }

    #[test]
    fn binary_quantization_bit_order() {
        let v = Vector::Float32(vec![1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.5]);
        assert_eq!(quantize_binary(&v).unwrap(), Vector::Bit(vec![0b1000_1001]));
        assert_eq!(
            quantize_binary(&Vector::Float32(vec![1.0; 7])),
            Err(Error::BitLength { dims: 7 })
        );
    }
}
