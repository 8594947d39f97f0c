//! The CLIP SQL functions. Each takes an optional model name as its last argument (see
//! `temp.clip_models` for how names resolve). They load models and read files, so they are
//! registered DIRECTONLY: a view or trigger in someone else's database cannot call them.

use rusqlite::functions::Context;
use rusqlite::types::{Value, ValueRef};

use super::clip_models::SharedNames;
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
    let (name, path) = resolved.map_err(|e| {
        if index < ctx.len() {
            arg_error(func, index, e)
        } else {
            fn_error(func, e)
        }
    })?;
    let model = registry::get(&path).map_err(|e| fn_error(func, format!("model '{name}': {e}")))?;
    Ok((name, model))
}

fn text(
    ctx: &Context<'_>,
    index: usize,
    func: &str,
    allow_empty: bool,
) -> rusqlite::Result<String> {
    match ctx.get_raw(index) {
        ValueRef::Text(t) if !t.is_empty() || allow_empty => {
            Ok(String::from_utf8_lossy(t).into_owned())
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
    let t = text(ctx, 0, F, false)?;
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
            read_image_file(&path).map_err(|e| arg_error(F, 0, e))?
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

/// Reads an image file, refusing what is not a regular file or is too large.
pub fn read_image_file(path: &str) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read image file '{path}': {e}"))?;
    if !meta.is_file() {
        return Err(format!("'{path}' is not a regular file"));
    }
    if meta.len() > crate::clip::preprocess::MAX_BYTES as u64 {
        return Err(format!(
            "image file '{path}' is {} bytes, larger than the limit of {} bytes",
            meta.len(),
            crate::clip::preprocess::MAX_BYTES
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read image file '{path}': {e}"))
}

pub fn clip_tokenize(ctx: &Context<'_>, names: &SharedNames) -> rusqlite::Result<Output> {
    const F: &str = "clip_tokenize";
    let t = text(ctx, 0, F, true)?;
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
