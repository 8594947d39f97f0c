//! Vector SQL functions. Names shared with sqlite-vec behave as sqlite-vec 0.1.9 does (see the
//! reference for the few deliberate differences: NaN/inf and zero vectors are errors here, never a
//! silent NULL). NULL in any vector argument gives NULL.

use rusqlite::functions::{Aggregate, Context};
use rusqlite::types::{Value, ValueRef};

use super::{arg_error, f32_arg, vector_arg, vector_output, Output, NULL};
use crate::vector::codec::{self, Vector};
use crate::vector::distance;

fn real(x: f64) -> Output {
    (Value::Real(x), None)
}

/// Both vector arguments, or `None` if either is NULL.
fn pair(ctx: &Context<'_>, func: &str) -> rusqlite::Result<Option<(Vector, Vector)>> {
    let a = vector_arg(ctx, 0, func)?;
    let b = vector_arg(ctx, 1, func)?;
    Ok(a.zip(b))
}

/// Runs a two-vector computation; its errors are about the 2nd argument (mismatches) unless the
/// first vector alone is at fault.
fn binary(
    ctx: &Context<'_>,
    func: &str,
    op: impl Fn(&Vector, &Vector) -> crate::error::Result<f64>,
) -> rusqlite::Result<Output> {
    match pair(ctx, func)? {
        None => Ok(NULL),
        Some((a, b)) => op(&a, &b).map(real).map_err(|e| arg_error(func, 1, e)),
    }
}

pub fn vec_f32(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    Ok(f32_arg(ctx, 0, "vec_f32")?.map_or(NULL, |v| vector_output(&Vector::Float32(v))))
}

pub fn vec_to_json(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    Ok(vector_arg(ctx, 0, "vec_to_json")?.map_or(NULL, |v| {
        (Value::Text(v.to_json()), Some(codec::JSON_SUBTYPE))
    }))
}

pub fn vec_length(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    Ok(vector_arg(ctx, 0, "vec_length")?.map_or(NULL, |v| (Value::Integer(v.dims() as i64), None)))
}

pub fn vec_distance_cosine(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    binary(ctx, "vec_distance_cosine", distance::cosine_distance_compat)
}

pub fn vec_distance_l2(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    binary(ctx, "vec_distance_l2", distance::l2_compat)
}

pub fn vec_cosine(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    binary(ctx, "vec_cosine", distance::cosine)
}

pub fn vec_dot(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    binary(ctx, "vec_dot", distance::dot)
}

fn add_sub(ctx: &Context<'_>, func: &str, subtract: bool) -> rusqlite::Result<Output> {
    match pair(ctx, func)? {
        None => Ok(NULL),
        Some((a, b)) => distance::add_sub(&a, &b, subtract)
            .map(|v| vector_output(&v))
            .map_err(|e| arg_error(func, 1, e)),
    }
}

pub fn vec_add(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    add_sub(ctx, "vec_add", false)
}

pub fn vec_sub(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    add_sub(ctx, "vec_sub", true)
}

pub fn vec_normalize(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    const F: &str = "vec_normalize";
    match f32_arg(ctx, 0, F)? {
        None => Ok(NULL),
        Some(v) => distance::normalize_compat(&v)
            .map(|n| vector_output(&Vector::Float32(n)))
            .map_err(|e| arg_error(F, 0, e)),
    }
}

pub fn vec_quantize_int8(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    const F: &str = "vec_quantize_int8";
    let v = f32_arg(ctx, 0, F)?;
    match ctx.get_raw(1) {
        ValueRef::Text(t) if t.eq_ignore_ascii_case(b"unit") => {}
        other => {
            return Err(arg_error(
                F,
                1,
                format!(
                    "unsupported quantization range {}, only 'unit' ([-1, 1]) is supported",
                    describe(other)
                ),
            ))
        }
    }
    Ok(v.map_or(NULL, |v| {
        vector_output(&Vector::Int8(codec::quantize_int8_unit(&v)))
    }))
}

pub fn vec_quantize_binary(ctx: &Context<'_>) -> rusqlite::Result<Output> {
    const F: &str = "vec_quantize_binary";
    match vector_arg(ctx, 0, F)? {
        None => Ok(NULL),
        Some(v) => codec::quantize_binary(&v)
            .map(|b| vector_output(&b))
            .map_err(|e| arg_error(F, 0, e)),
    }
}

fn describe(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(t)),
        other => super::type_name(other).to_owned(),
    }
}

/// `vec_avg(v)`: the element-wise mean of a group of float32 vectors (NULLs skipped), as a
/// float32 blob; NULL for an empty group. Sums in f64 so a large group loses no precision.
pub struct VecAvg;

#[derive(Default)]
pub struct AvgState {
    sum: Vec<f64>,
    count: u64,
}

impl Aggregate<AvgState, Output> for VecAvg {
    fn init(&self, _ctx: &mut Context<'_>) -> rusqlite::Result<AvgState> {
        Ok(AvgState::default())
    }

    fn step(&self, ctx: &mut Context<'_>, state: &mut AvgState) -> rusqlite::Result<()> {
        super::guard("vec_avg", || {
            let Some(v) = f32_arg(ctx, 0, "vec_avg")? else {
                return Ok(());
            };
            if state.count == 0 {
                state.sum = vec![0.0; v.len()];
            } else if v.len() != state.sum.len() {
                return Err(arg_error(
                    "vec_avg",
                    0,
                    crate::error::Error::DimensionMismatch {
                        left: state.sum.len(),
                        right: v.len(),
                    },
                ));
            }
            for (s, x) in state.sum.iter_mut().zip(&v) {
                *s += f64::from(*x);
            }
            state.count += 1;
            Ok(())
        })
    }

    fn finalize(
        &self,
        _ctx: &mut Context<'_>,
        state: Option<AvgState>,
    ) -> rusqlite::Result<Output> {
        match state {
            Some(s) if s.count > 0 => {
                let n = s.count as f64;
                let mean: Vec<f32> = s.sum.iter().map(|x| (x / n) as f32).collect();
                Ok(vector_output(&Vector::Float32(mean)))
            }
            _ => Ok(NULL),
        }
    }
}
