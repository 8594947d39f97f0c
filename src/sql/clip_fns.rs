//! The CLIP SQL functions. Each takes an optional model name as its last argument (see
//! `temp.clip_models` for how names resolve). They load models and read files, so they are
//! registered DIRECTONLY: a view or trigger in someone else's database cannot call them.

use std::sync::Arc;

use rusqlite::functions::Context;
use rusqlite::types::{Value, ValueRef};

use super::clip_models::SharedNames;
use super::policy::Policy;
use super::{arg_error, fn_error, type_name, Output};
use crate::clip::load::LoadedModel;
use crate::clip::registry;
use crate::vector::{ElementType, Vector};

/// A CLIP function of the registration list: the connection's model names are passed in.
pub type ClipFn = fn(&Context<'_>, &SharedNames) -> rusqlite::Result<Output>;

/// The model named by argument `index` (if given) or the default model.
fn model(
    ctx: &Context<'_>,
    names: &SharedNames,
    index: usize,
    func: &str,
) -> rusqlite::Result<(String, std::sync::Arc<LoadedModel>)> {
    let name = if index < ctx.len() {
        match ctx.get_raw(index) {
            ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Null => None,
            other => {
                return Err(arg_error(
                    func,
                    index,
                    format!("expected a model name, found {}", type_name(other)),
                ))
            }
        }
    } else {
        None
    };
    let resolved = names
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .resolve(name.as_deref());
    let (name, path, precision) = resolved.map_err(|e| {
        if index < ctx.len() {
            arg_error(func, index, e)
        } else {
            fn_error(func, e)
        }
    })?;
    let model = registry::get_in(&path, precision)
        .map_err(|e| fn_error(func, format!("model '{name}': {e}")))?;
    Ok((name, model))
}

/// A copy of the connection's policy.
pub fn policy(names: &SharedNames) -> Arc<Policy> {
    names
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .policy
        .clone()
}

fn text(
    ctx: &Context<'_>,
    names: &SharedNames,
    index: usize,
    func: &str,
    allow_empty: bool,
) -> rusqlite::Result<String> {
    match ctx.get_raw(index) {
        ValueRef::Text(t) if !t.is_empty() || allow_empty => {
            let text = String::from_utf8_lossy(t).into_owned();
            policy(names)
                .check_text(&text)
                .map_err(|e| arg_error(func, index, e))?;
            Ok(text)
        }
        ValueRef::Text(_) => Err(arg_error(
            func,
            index,
            "empty text: there is nothing to embed",
        )),
        other => Err(arg_error(
            func,
            index,
            format!("expected text, found {}", type_name(other)),
        )),
    }
}

fn vector_output(v: Vec<f32>) -> Output {
    let v = Vector::Float32(v);
    (
        Value::Blob(v.to_blob()),
        Some(ElementType::Float32.subtype()),
    )
}

pub fn clip_embed_text(ctx: &Context<'_>, names: &SharedNames) -> rusqlite::Result<Output> {
    const F: &str = "clip_embed_text";
    let t = text(ctx, names, 0, F, false)?;
    let (_, m) = model(ctx, names, 1, F)?;
    m.embed_text(&t)
        .map(vector_output)
        .map_err(|e| fn_error(F, e))
}

pub fn clip_embed_image(ctx: &Context<'_>, names: &SharedNames) -> rusqlite::Result<Output> {
    const F: &str = "clip_embed_image";
    let bytes = match ctx.get_raw(0) {
        ValueRef::Blob(b) => b.to_vec(),
        ValueRef::Text(t) => {
            let path = String::from_utf8_lossy(t).into_owned();
            policy(names)
                .read_image_file(&path, crate::clip::preprocess::MAX_BYTES)
                .map_err(|e| arg_error(F, 0, e))?
        }
        other => {
            return Err(arg_error(
                F,
                0,
                format!(
                    "expected image bytes (a BLOB) or a file path (TEXT), found {}",
                    type_name(other)
                ),
            ))
        }
    };
    let (_, m) = model(ctx, names, 1, F)?;
    m.embed_image(&bytes)
        .map(vector_output)
        .map_err(|e| arg_error(F, 0, e))
}

pub fn clip_tokenize(ctx: &Context<'_>, names: &SharedNames) -> rusqlite::Result<Output> {
    const F: &str = "clip_tokenize";
    let t = text(ctx, names, 0, F, true)?;
    let (_, m) = model(ctx, names, 1, F)?;
    let ids = m.tokenize(&t).map_err(|e| fn_error(F, e))?;
    Ok((
        Value::Text(serde_json::to_string(&ids).unwrap_or_default()),
        Some(crate::vector::codec::JSON_SUBTYPE),
    ))
}

pub fn clip_model_info(ctx: &Context<'_>, names: &SharedNames) -> rusqlite::Result<Output> {
    const F: &str = "clip_model_info";
    let (name, m) = model(ctx, names, 0, F)?;
    Ok((
        Value::Text(m.info(&name).to_string()),
        Some(crate::vector::codec::JSON_SUBTYPE),
    ))
}
