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
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

fn scalar_l2sq(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum()
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
        return Err(Error::DimensionMismatch { left: a.dims(), right: b.dims() });
    }
    Ok(())
}

fn as_f64_pair(a: &Vector, b: &Vector, op: &'static str) -> Result<(Vec<f64>, Vec<f64>)> {
    match (a, b) {
        (Vector::Int8(x), Vector::Int8(y)) => Ok((
            x.iter().map(|&e| f64::from(e)).collect(),
            y.iter().map(|&e| f64::from(e)).collect(),
        )),
        _ => Err(Error::UnsupportedElementType { op, element: a.element_type().name() }),
    }
}

/// Dot product. float32 and int8.
pub fn dot(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    if let (Vector::Float32(x), Vector::Float32(y)) = (a, b) {
        return Ok(dot_f32(x, y));
    }
    let (x, y) = as_f64_pair(a, b, "the dot product")?;
    Ok(x.iter().zip(&y).map(|(p, q)| p * q).sum())
}

/// Cosine similarity. A zero vector has no direction: that is an error, not a silent NULL.
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
        return Err(Error::InvalidArgument {
            what: "cosine is undefined for a zero vector (all elements are 0)".into(),
        });
    }
    Ok((ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))
}

/// Euclidean distance. float32 and int8.
pub fn l2(a: &Vector, b: &Vector) -> Result<f64> {
    check_pair(a, b)?;
    if let (Vector::Float32(x), Vector::Float32(y)) = (a, b) {
        return Ok(l2sq_f32(x, y).sqrt());
    }
    let (x, y) = as_f64_pair(a, b, "L2 distance")?;
    Ok(x.iter().zip(&y).map(|(p, q)| (p - q).powi(2)).sum::<f64>().sqrt())
}

/// Element-wise a + b or a - b (float32 and int8, as sqlite-vec; int8 wraps as C's int8 cast).
pub fn add_sub(a: &Vector, b: &Vector, subtract: bool) -> Result<Vector> {
    check_pair(a, b)?;
    match (a, b) {
        (Vector::Float32(x), Vector::Float32(y)) => Ok(Vector::Float32(
            x.iter().zip(y).map(|(p, q)| if subtract { p - q } else { p + q }).collect(),
        )),
        (Vector::Int8(x), Vector::Int8(y)) => Ok(Vector::Int8(
            x.iter()
                .zip(y)
                .map(|(p, q)| if subtract { p.wrapping_sub(*q) } else { p.wrapping_add(*q) })
                .collect(),
        )),
        _ => Err(Error::UnsupportedElementType {
            op: if subtract { "subtraction" } else { "addition" },
            element: "bit",
        }),
    }
}

/// v / |v| (float32 only). The zero vector cannot be normalized.
pub fn normalize(v: &[f32]) -> Result<Vec<f32>> {
    let n = norm_f32(v);
    if n == 0.0 {
        return Err(Error::InvalidArgument {
            what: "cannot normalize a zero vector (all elements are 0)".into(),
        });
    }
    Ok(v.iter().map(|&x| (f64::from(x) / n) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_kernels_agree_with_scalar() {
        let a: Vec<f32> = (0..515).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let b: Vec<f32> = (0..515).map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0).collect();
        let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-9);
        assert!(rel(dot_f32(&a, &b), scalar_dot(&a, &b)) < 1e-5);
        assert!(rel(l2sq_f32(&a, &b), scalar_l2sq(&a, &b)) < 1e-5);
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
