//! Distances and similarities. float32 goes through SimSIMD (AVX-512 / AVX2 / NEON kernels chosen
//! at run time); int8 is scalar (it is only ever used on single pairs). The formulas follow
//! sqlite-vec: cosine distance = 1 - cosine similarity, L2 = Euclidean distance.

use simsimd::SpatialSimilarity;

use crate::error::{Error, Result};
use crate::vector::Vector;

/// Dot product of two equal-length float32 slices.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    f32::dot(a, b).unwrap_or_else(|| scalar_dot(a, b))
}

/// Squared Euclidean distance of two equal-length float32 slices.
#[inline]
pub fn l2sq_f32(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    f32::l2sq(a, b).unwrap_or_else(|| scalar_l2sq(a, b))
}

/// Euclidean norm.
#[inline]
pub fn norm_f32(a: &[f32]) -> f64 {
    dot_f32(a, a).sqrt()
}

fn scalar_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn scalar_l2sq(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum()
}

/// The metrics a search or a distance function can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// score = cosine similarity (-1..1), distance = 1 - score.
    Cosine,
    /// score = dot product, distance = -score.
    Dot,
    /// distance = Euclidean distance, score = -distance.
    L2,
}

impl Metric {
    pub fn parse(name: &str) -> Result<Metric> {
        match name.to_ascii_lowercase().as_str() {
            "cosine" => Ok(Metric::Cosine),
            "dot" => Ok(Metric::Dot),
            "l2" => Ok(Metric::L2),
            _ => Err(Error::InvalidArgument {
                what: format!("unknown metric '{name}', expected 'cosine', 'dot' or 'l2'"),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
            Metric::L2 => "l2",
        }
    }

    /// The sqlite-vec style distance (smaller is nearer) for a score of this metric.
    pub fn distance_from_score(self, score: f64) -> f64 {
        match self {
            Metric::Cosine => 1.0 - score,
            Metric::Dot | Metric::L2 => -score,
        }
    }
}

fn check_pair(a: &Vector, b: &Vector) -> Result<()> {
    if a.element_type() != b.element_type() {
        return Err(Error::ElementTypeMismatch {
            left: a.element_type().name(),
            right: b.element_type().name(),
        });
    }
    if a.dims() != b.dims() {
        return Err(Error::DimensionMismatch {
            left: a.dims(),
            right: b.dims(),
        });
    }
    Ok(())
}

fn as_f64_pair(a: &Vector, b: &Vector, op: &'static str) -> Result<(Vec<f64>, Vec<f64>)> {
    match (a, b) {
        (Vector::Int8(x), Vector::Int8(y)) => Ok((
            x.iter().map(|&e| f64::from(e)).collect(),
            y.iter().map(|&e| f64::from(e)).collect(),
        )),
        _ => Err(Error::UnsupportedElementType {
            op,
            element: a.element_type().name(),
        }),
    }
}

/// Dot product (SIMD, f64 result). float32 and int8.
pub fn dot(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    if let (Vector::Float32(x), Vector::Float32(y)) = (a, b) {
        return Ok(dot_f32(x, y));
    }
    let (x, y) = as_f64_pair(a, b, "the dot product")?;
    Ok(x.iter().zip(&y).map(|(p, q)| p * q).sum())
}

/// Cosine similarity (SIMD, f64 result). A zero vector has no direction: that is an error, not
/// a silent NULL.
pub fn cosine(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    let (ab, aa, bb) = match (a, b) {
        (Vector::Float32(x), Vector::Float32(y)) => (dot_f32(x, y), dot_f32(x, x), dot_f32(y, y)),
        _ => {
            let (x, y) = as_f64_pair(a, b, "cosine")?;
            let d = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(s, t)| s * t).sum::<f64>();
            (d(&x, &y), d(&x, &x), d(&y, &y))
        }
    };
    if aa == 0.0 || bb == 0.0 {
        return Err(zero_cosine());
    }
    Ok((ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))
}

fn zero_cosine() -> Error {
    Error::InvalidArgument {
        what: "cosine is undefined for a zero vector (all elements are 0)".into(),
    }
}

/// The elements of a float32 or int8 vector as f32 (int8 converts exactly), for the
/// sqlite-vec-compatible kernels below.
fn as_f32(v: &Vector, op: &'static str) -> Result<Vec<f32>> {
    match v {
        Vector::Float32(x) => Ok(x.clone()),
        Vector::Int8(x) => Ok(x.iter().map(|&e| f32::from(e)).collect()),
        Vector::Bit(_) => Err(Error::UnsupportedElementType { op, element: "bit" }),
    }
}

/// sqlite-vec's `vec_distance_cosine`, bit for bit: dot and squared norms summed in f32 in index
/// order, `1 - dot / (sqrt(aa) * sqrt(bb))` in f64, rounded to f32. (int8 products are exact
/// integers before the f32 add, as there.) A zero vector is an error here; sqlite-vec gives NULL.
pub fn cosine_distance_compat(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    let (x, y) = (as_f32(a, "cosine distance")?, as_f32(b, "cosine distance")?);
    let (mut ab, mut aa, mut bb) = (0f32, 0f32, 0f32);
    for (p, q) in x.iter().zip(&y) {
        ab += p * q;
        aa += p * p;
        bb += q * q;
    }
    if aa == 0.0 || bb == 0.0 {
        return Err(zero_cosine());
    }
    let d = 1.0 - f64::from(ab) / (f64::from(aa).sqrt() * f64::from(bb).sqrt());
    Ok(f64::from(d as f32))
}

/// sqlite-vec's `vec_distance_l2`, bit for bit: squared differences summed in f32 in index
/// order, square root rounded to f32.
pub fn l2_compat(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    let (x, y) = (as_f32(a, "L2 distance")?, as_f32(b, "L2 distance")?);
    let mut sum = 0f32;
    for (p, q) in x.iter().zip(&y) {
        let t = p - q;
        sum += t * t;
    }
    Ok(f64::from(f64::from(sum).sqrt() as f32))
}

/// sqlite-vec's `vec_normalize`, bit for bit: the norm summed in f32, each element divided by it
/// in f32. The zero vector cannot be normalized (sqlite-vec returns NaNs).
pub fn normalize_compat(v: &[f32]) -> Result<Vec<f32>> {
    let norm = v.iter().fold(0f32, |s, x| s + x * x).sqrt();
    if norm == 0.0 {
        return Err(Error::InvalidArgument {
            what: "cannot normalize a zero vector (all elements are 0)".into(),
        });
    }
    Ok(v.iter().map(|x| x / norm).collect())
}

/// Element-wise a + b or a - b (float32 and int8, as sqlite-vec; int8 wraps as C's int8 cast).
pub fn add_sub(a: &Vector, b: &Vector, subtract: bool) -> Result<Vector> {
    check_pair(a, b)?;
    match (a, b) {
        (Vector::Float32(x), Vector::Float32(y)) => Ok(Vector::Float32(
            x.iter()
                .zip(y)
                .map(|(p, q)| if subtract { p - q } else { p + q })
                .collect(),
        )),
        (Vector::Int8(x), Vector::Int8(y)) => Ok(Vector::Int8(
            x.iter()
                .zip(y)
                .map(|(p, q)| {
                    if subtract {
                        p.wrapping_sub(*q)
                    } else {
                        p.wrapping_add(*q)
                    }
                })
                .collect(),
        )),
        _ => Err(Error::UnsupportedElementType {
            op: if subtract { "subtraction" } else { "addition" },
            element: "bit",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_kernels_agree_with_scalar() {
        let a: Vec<f32> = (0..515)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let b: Vec<f32> = (0..515)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0)
            .collect();
        let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-9);
        assert!(rel(dot_f32(&a, &b), scalar_dot(&a, &b)) < 1e-5);
        assert!(rel(l2sq_f32(&a, &b), scalar_l2sq(&a, &b)) < 1e-5);
    }

    #[test]
    fn compat_kernels_follow_sqlite_vec() {
        // Values recorded from sqlite-vec 0.1.9.
        let i8v = |v: &[i8]| Vector::Int8(v.to_vec());
        assert_eq!(
            cosine_distance_compat(&i8v(&[1, 2, 3]), &i8v(&[3, 2, 1])).unwrap(),
            0.2857142984867096
        );
        assert_eq!(l2_compat(&i8v(&[-128]), &i8v(&[127])).unwrap(), 255.0);
        assert!(normalize_compat(&[0.0, 0.0]).is_err());
        assert_eq!(normalize_compat(&[3.0, 4.0]).unwrap(), vec![0.6, 0.8]);
    }

    #[test]
    fn cosine_rules() {
        let a = Vector::Float32(vec![1.0, 0.0]);
        let b = Vector::Float32(vec![0.0, 2.0]);
        assert_eq!(cosine(&a, &a).unwrap(), 1.0);
        assert_eq!(cosine(&a, &b).unwrap(), 0.0);
        assert!(cosine(&a, &Vector::Float32(vec![0.0, 0.0])).is_err());
        assert_eq!(
            cosine(&a, &Vector::Float32(vec![1.0])),
            Err(Error::DimensionMismatch { left: 2, right: 1 })
        );
    }
}
