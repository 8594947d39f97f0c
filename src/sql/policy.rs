//! What SQL on one connection may do: read image files (and from which directories), load models
//! (from which directories), write model directories, run training or evaluation, and how much one
//! call may cost. The host process sets it (environment variables, or `archaeclip_restrict()` on a
//! trusted connection); SQL can tighten a trusted connection's policy but never loosen one.
//! SECURITY.md is the user-facing statement of this policy.
//!
//! The level is decided when the extension is loaded into a connection, in this order:
//! 1. `ARCHAECLIP_POLICY=trusted|untrusted`, if set;
//! 2. untrusted if the connection is read-only or `query_only` (how Datasette opens databases), or
//!    if the host process is Datasette (its command line names `datasette`);
//! 3. otherwise trusted: the sqlite3 shell, scripts and notebooks work without configuration.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use rusqlite::types::{Value, ValueRef};
use serde_json::json;

use super::clip_models::SharedNames;
use super::{arg_error, type_name, Output};

/// `trusted` or `untrusted`: overrides the automatic choice.
pub const POLICY_ENV: &str = "ARCHAECLIP_POLICY";
/// Directories image paths may be read from (`:`-separated). Untrusted default: none.
pub const FILE_ROOTS_ENV: &str = "ARCHAECLIP_FILE_ROOTS";
/// Directories models may be loaded from and training may write to (`:`-separated).
pub const MODEL_ROOTS_ENV: &str = "ARCHAECLIP_MODEL_ROOTS";

/// Directories whose files are never images: refused whatever the roots say.
const SYSTEM_DIRS: &[&str] = &["/proc", "/sys", "/dev"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The person running SQL controls the machine (the sqlite3 shell, a script).
    Trusted,
    /// SQL may come from strangers (a web host, a stranger's database).
    Untrusted,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Trusted => "trusted",
            Level::Untrusted => "untrusted",
        }
    }
}

/// Per-call cost bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `k` of a search.
    pub max_k: usize,
    /// Largest batch of the batched embedding functions.
    pub max_batch: usize,
    /// Longest text (bytes) that is tokenized.
    pub max_text_bytes: usize,
}

impl Limits {
    pub const TRUSTED: Limits = Limits {
        max_k: 100_000,
        max_batch: 256,
        max_text_bytes: 1 << 20,
    };
    pub const UNTRUSTED: Limits = Limits {
        max_k: 1_000,
        max_batch: 16,
        max_text_bytes: 16 << 10,
    };
}

/// The policy of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub level: Level,
    /// Why this level (shown by `archaeclip_policy()` and in refusals).
    pub reason: String,
    /// Canonical directories image files may be read from; `None`: any readable file.
    pub file_roots: Option<Vec<PathBuf>>,
    /// Canonical directories models may be loaded from and written to; `None`: anywhere.
    pub model_roots: Option<Vec<PathBuf>>,
    pub limits: Limits,
}

/// What the host told us: the environment and the connection's state at load time.
#[derive(Debug, Default, Clone)]
pub struct Host {
    pub policy: Option<String>,
    pub file_roots: Option<String>,
    pub model_roots: Option<String>,
    pub read_only: bool,
    pub datasette: bool,
}

impl Host {
    /// The environment of this process; `read_only` is the connection's.
    pub fn from_env(read_only: bool) -> Host {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Host {
            policy: var(POLICY_ENV),
            file_roots: var(FILE_ROOTS_ENV),
            model_roots: var(MODEL_ROOTS_ENV),
            read_only,
            datasette: process_is_datasette(),
        }
    }
}

/// Whether this process's command line runs Datasette (`.../bin/datasette ...` or
/// `python -m datasette ...`).
fn process_is_datasette() -> bool {
    let Ok(cmdline) = std::fs::read("/proc/self/cmdline") else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.iter().enumerate().any(|(i, arg)| {
        let name = Path::new(std::ffi::OsStr::from_bytes(arg)).file_name();
        name.is_some_and(|n| n == "datasette")
            || (i > 0 && args[i - 1] == b"-m" && arg.starts_with(b"datasette"))
    })
}

impl Default for Policy {
    /// Trusted, without roots: what a connection gets when nothing says otherwise.
    fn default() -> Policy {
        Policy {
            level: Level::Trusted,
            reason: format!("the connection is writable and {POLICY_ENV} is not set"),
            file_roots: None,
            model_roots: None,
            limits: Limits::TRUSTED,
        }
    }
}

impl Policy {
    /// The policy for a connection, or why the host's configuration is wrong.
    pub fn decide(host: &Host) -> Result<Policy, String> {
        let (level, reason) = match host.policy.as_deref().map(str::trim) {
            Some("trusted") => (Level::Trusted, format!("{POLICY_ENV} is 'trusted'")),
            Some("untrusted") => (Level::Untrusted, format!("{POLICY_ENV} is 'untrusted'")),
            Some(other) => {
                return Err(format!(
                    "{POLICY_ENV} must be 'trusted' or 'untrusted', found '{other}'"
                ))
            }
            None if host.read_only => (
                Level::Untrusted,
                "the connection is read-only, as web hosts such as Datasette open databases".into(),
            ),
            None if host.datasette => (Level::Untrusted, "the host process is Datasette".into()),
            None => (
                Level::Trusted,
                format!("the connection is writable and {POLICY_ENV} is not set"),
            ),
        };
        let file_roots = match &host.file_roots {
            Some(list) => Some(roots(FILE_ROOTS_ENV, list)?),
            None if level == Level::Untrusted => Some(Vec::new()),
            None => None,
        };
        let model_roots = match &host.model_roots {
            Some(list) => Some(roots(MODEL_ROOTS_ENV, list)?),
            None => None,
        };
        Ok(Policy {
            level,
            reason,
            file_roots,
            model_roots,
            limits: match level {
                Level::Trusted => Limits::TRUSTED,
                Level::Untrusted => Limits::UNTRUSTED,
            },
        })
    }

    fn label(&self) -> String {
        format!("{} because {}", self.level.name(), self.reason)
    }

    /// Refuses what only a trusted connection may do: `what` is e.g. "training".
    pub fn require_trusted(&self, what: &str) -> Result<(), String> {
        match self.level {
            Level::Trusted => Ok(()),
            Level::Untrusted => Err(format!(
                "{what} is not allowed on this connection: its policy is {}; the host can set \
                 {POLICY_ENV}=trusted",
                self.label()
            )),
        }
    }

    /// The policy as JSON, for `archaeclip_policy()`.
    pub fn to_json(&self) -> serde_json::Value {
        let list = |r: &Option<Vec<PathBuf>>| {
            r.as_ref().map(|v| {
                v.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
            })
        };
        let trusted = self.level == Level::Trusted;
        json!({
            "level": self.level.name(),
            "reason": self.reason,
            "file_roots": list(&self.file_roots),
            "model_roots": list(&self.model_roots),
            "write": trusted,
            "train": trusted,
            "evaluate": trusted,
            "limits": {
                "max_k": self.limits.max_k,
                "max_batch": self.limits.max_batch,
                "max_text_bytes": self.limits.max_text_bytes,
                "max_image_bytes": crate::clip::preprocess::MAX_BYTES,
                "max_image_pixels": crate::clip::preprocess::MAX_PIXELS,
            },
        })
    }

    /// Tightens this policy with `archaeclip_restrict()`'s JSON: `{"level": "untrusted",
    /// "file_roots": [...], "model_roots": [...]}`, every key optional. New roots must lie inside
    /// the current ones. Only a trusted connection may call it.
    pub fn restrict(&mut self, spec: &str) -> Result<(), String> {
        self.require_trusted("changing the policy")?;
        let spec: serde_json::Value =
            serde_json::from_str(spec).map_err(|e| format!("not valid JSON: {e}"))?;
        let Some(object) = spec.as_object() else {
            return Err("expected a JSON object like {\"level\": \"untrusted\"}".into());
        };
        let mut next = self.clone();
        for (key, value) in object {
            match key.as_str() {
                "level" => match value.as_str() {
                    Some("untrusted") => {
                        next.level = Level::Untrusted;
                        next.limits = Limits::UNTRUSTED;
                        next.file_roots.get_or_insert_with(Vec::new);
                    }
                    Some("trusted") => {}
                    _ => return Err("'level' must be 'untrusted' (or 'trusted': no change)".into()),
                },
                "file_roots" | "model_roots" => {
                    let Some(items) = value.as_array() else {
                        return Err(format!("'{key}' must be an array of directory paths"));
                    };
                    let mut new = Vec::new();
                    for item in items {
                        let Some(p) = item.as_str() else {
                            return Err(format!("'{key}' must be an array of directory paths"));
                        };
                        new.push(root(key, p)?);
                    }
                    let current = if key == "file_roots" {
                        &mut next.file_roots
                    } else {
                        &mut next.model_roots
                    };
                    if let Some(old) = current {
                        if let Some(outside) =
                            new.iter().find(|p| !old.iter().any(|o| p.starts_with(o)))
                        {
                            return Err(format!(
                                "'{key}': '{}' is outside the current roots: a policy can only \
                                 be narrowed",
                                outside.display()
                            ));
                        }
                    }
                    *current = Some(new);
                }
                other => {
                    return Err(format!(
                        "unknown key '{other}' (known: level, file_roots, model_roots)"
                    ))
                }
            }
        }
        next.reason = format!("{}, and archaeclip_restrict() narrowed it", next.reason);
        *self = next;
        Ok(())
    }

    /// Reads an image file named by SQL, if the policy allows it: the path is canonicalised
    /// (symlinks and `..` resolved) and must lie in a file root; /proc, /sys and /dev, and
    /// anything that is not a regular file, are refused; at most `max_bytes` are read. The error
    /// reveals at most whether a path inside the roots exists, never its contents.
    pub fn read_image_file(&self, path: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
        let canonical = self.resolve_readable(path)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the canonical path
        // has no symlink, so one appearing now is refused.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&canonical)
            .map_err(|e| format!("cannot read image file '{path}': {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read image file '{path}': {e}"))?;
        if !meta.is_file() {
            return Err(format!("'{path}' is not a regular file"));
        }
        if meta.len() > max_bytes as u64 {
            return Err(format!(
                "image file '{path}' is {} bytes, larger than the limit of {max_bytes} bytes",
                meta.len()
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read image file '{path}': {e}"))?;
        if bytes.len() > max_bytes {
            return Err(format!(
                "image file '{path}' grew past the limit of {max_bytes} bytes while being read"
            ));
        }
        Ok(bytes)
    }

    /// The canonical form of a path SQL names, if the policy lets it be read (see
    /// [`Self::read_image_file`]); the file itself is not opened.
    pub fn resolve_readable(&self, path: &str) -> Result<PathBuf, String> {
        if self.file_roots.as_ref().is_some_and(Vec::is_empty) {
            return Err(format!(
                "reading files is not allowed on this connection (policy {}): pass the image \
                 bytes as a BLOB, or let the host allow directories with {FILE_ROOTS_ENV}",
                self.label()
            ));
        }
        let outside = || {
            format!(
                "'{path}' is outside the directories this connection may read images from \
                 (see archaeclip_policy())"
            )
        };
        let canonical = match Path::new(path).canonicalize() {
            Ok(p) => p,
            // Outside the roots, a missing file and a present one get the same answer.
            Err(_) if !self.within_file_roots(&lexical_absolute(path)) => return Err(outside()),
            Err(e) => return Err(format!("cannot read '{path}': {e}")),
        };
        if let Some(dir) = SYSTEM_DIRS.iter().find(|d| canonical.starts_with(d)) {
            return Err(format!("'{path}' is under {dir}: not an image file"));
        }
        if !self.within_file_roots(&canonical) {
            return Err(outside());
        }
        Ok(canonical)
    }

    /// Whether the policy lets SQL read `path` (nothing is opened).
    pub fn check_readable(&self, path: &str) -> Result<(), String> {
        self.resolve_readable(path).map(|_| ())
    }

    /// The canonical form of a directory SQL wants listed, if the policy allows reading there.
    pub fn check_directory(&self, dir: &str) -> Result<PathBuf, String> {
        let canonical = self.resolve_readable(dir)?;
        if canonical.is_dir() {
            Ok(canonical)
        } else {
            Err(format!("'{dir}' is not a directory"))
        }
    }

    fn within_file_roots(&self, p: &Path) -> bool {
        within(&self.file_roots, p)
    }

    /// Checks a model directory named by SQL or the environment against the model roots.
    pub fn check_model_dir(&self, path: &Path) -> Result<(), String> {
        if self.model_roots.is_none() {
            return Ok(());
        }
        let canonical = path
            .canonicalize()
            .unwrap_or_else(|_| lexical_absolute(&path.to_string_lossy()));
        if within(&self.model_roots, &canonical) {
            Ok(())
        } else {
            Err(format!(
                "model directory '{}' is outside the directories this connection may use for \
                 models ({MODEL_ROOTS_ENV}; see archaeclip_policy())",
                path.display()
            ))
        }
    }

    /// Checks a directory that training would write: allowed on a trusted connection, inside
    /// the model roots when they are set. `output` may not exist yet: its parent is checked.
    pub fn check_output_dir(&self, output: &Path) -> Result<(), String> {
        self.require_trusted("writing a model directory (training)")?;
        if self.model_roots.is_none() {
            return Ok(());
        }
        let parent = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = output.file_name().unwrap_or_default();
        let canonical = parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| lexical_absolute(&output.to_string_lossy()));
        if within(&self.model_roots, &canonical) {
            Ok(())
        } else {
            Err(format!(
                "output directory '{}' is outside the directories this connection may write \
                 models to ({MODEL_ROOTS_ENV}; see archaeclip_policy())",
                output.display()
            ))
        }
    }

    /// Refuses a text longer than the limit (tokenizing is linear in the text, and CLIP keeps
    /// only the first 77 tokens).
    pub fn check_text(&self, text: &str) -> Result<(), String> {
        if text.len() > self.limits.max_text_bytes {
            Err(format!(
                "text is {} bytes, longer than this connection's limit of {} bytes (CLIP reads \
                 only its first 77 tokens)",
                text.len(),
                self.limits.max_text_bytes
            ))
        } else {
            Ok(())
        }
    }
}

fn within(roots: &Option<Vec<PathBuf>>, p: &Path) -> bool {
    roots
        .as_ref()
        .is_none_or(|roots| roots.iter().any(|r| p.starts_with(r)))
}

/// `path` made absolute against the working directory with `.` and `..` removed textually (for
/// paths that cannot be canonicalised because they do not exist).
fn lexical_absolute(path: &str) -> PathBuf {
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn root(var: &str, dir: &str) -> Result<PathBuf, String> {
    let p = Path::new(dir)
        .canonicalize()
        .map_err(|e| format!("{var}: cannot use '{dir}' as a directory: {e}"))?;
    if !p.is_dir() {
        return Err(format!("{var}: '{dir}' is not a directory"));
    }
    Ok(p)
}

fn roots(var: &str, list: &str) -> Result<Vec<PathBuf>, String> {
    std::env::split_paths(list)
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| root(var, &p.to_string_lossy()))
        .collect()
}

/// `archaeclip_policy()`: this connection's policy as JSON.
pub fn archaeclip_policy(
    _ctx: &rusqlite::functions::Context<'_>,
    names: &SharedNames,
) -> rusqlite::Result<Output> {
    let json = super::clip_fns::policy(names).to_json().to_string();
    Ok((Value::Text(json), Some(crate::vector::codec::JSON_SUBTYPE)))
}

/// `archaeclip_restrict(json)`: narrows a trusted connection's policy; returns the new policy.
pub fn archaeclip_restrict(
    ctx: &rusqlite::functions::Context<'_>,
    names: &SharedNames,
) -> rusqlite::Result<Output> {
    const F: &str = "archaeclip_restrict";
    let spec = match ctx.get_raw(0) {
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        other => {
            return Err(arg_error(
                F,
                0,
                format!("expected JSON text, found {}", type_name(other)),
            ))
        }
    };
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    std::sync::Arc::make_mut(&mut names.policy)
        .restrict(&spec)
        .map_err(|e| arg_error(F, 0, e))?;
    let json = names.policy.to_json().to_string();
    Ok((Value::Text(json), Some(crate::vector::codec::JSON_SUBTYPE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untrusted_with_roots(files: &Path) -> Policy {
        Policy::decide(&Host {
            policy: Some("untrusted".into()),
            file_roots: Some(files.display().to_string()),
            ..Host::default()
        })
        .unwrap()
    }

    #[test]
    fn the_level_follows_the_environment_then_the_connection_then_the_process() {
        let level = |h: Host| Policy::decide(&h).unwrap().level;
        assert_eq!(level(Host::default()), Level::Trusted);
        let ro = Host {
            read_only: true,
            ..Host::default()
        };
        assert_eq!(level(ro.clone()), Level::Untrusted);
        let datasette = Host {
            datasette: true,
            ..Host::default()
        };
        assert_eq!(level(datasette), Level::Untrusted);
        let forced = Host {
            policy: Some("trusted".into()),
            ..ro
        };
        assert_eq!(level(forced), Level::Trusted);
        let err = Policy::decide(&Host {
            policy: Some("yes".into()),
            ..Host::default()
        })
        .unwrap_err();
        assert!(err.contains("ARCHAECLIP_POLICY must be"), "{err}");
        let err = Policy::decide(&Host {
            file_roots: Some("/no/such/dir".into()),
            ..Host::default()
        })
        .unwrap_err();
        assert!(
            err.contains("ARCHAECLIP_FILE_ROOTS: cannot use '/no/such/dir'"),
            "{err}"
        );
    }

    #[test]
    fn untrusted_without_roots_reads_no_file_and_says_so_without_touching_it() {
        let p = Policy::decide(&Host {
            read_only: true,
            ..Host::default()
        })
        .unwrap();
        assert_eq!(p.file_roots, Some(vec![]));
        let err = p.read_image_file("/etc/passwd", 1 << 20).unwrap_err();
        assert!(err.contains("reading files is not allowed"), "{err}");
        assert!(err.contains("read-only"), "{err}");
        assert_eq!(
            err,
            p.read_image_file("/no/such/file", 1 << 20).unwrap_err(),
            "existence must not show"
        );
    }

    #[test]
    fn roots_refuse_traversal_symlinks_out_and_system_files() {
        let base = std::env::temp_dir().join(format!("archaeclip-policy-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.png"), b"png bytes").unwrap();
        std::fs::write(base.join("secret.png"), b"secret").unwrap();
        let link = root.join("escape.png");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(base.join("secret.png"), &link).unwrap();
        let p = untrusted_with_roots(&root);

        let ok = |path: &Path| p.read_image_file(path.to_str().unwrap(), 1 << 20);
        assert_eq!(ok(&root.join("sub/a.png")).unwrap(), b"png bytes");
        assert_eq!(ok(&root.join("sub/../sub/a.png")).unwrap(), b"png bytes");
        for bad in [
            root.join("../secret.png"),
            root.join("sub/../../secret.png"),
            link.clone(),
            root.join("../no-such.png"),
            PathBuf::from("/etc/passwd"),
        ] {
            let err = ok(&bad).unwrap_err();
            assert!(err.contains("is outside the directories"), "{bad:?}: {err}");
            assert!(!err.contains("secret\""), "{err}");
        }
        // Inside the root, a missing file says so.
        let err = ok(&root.join("sub/missing.png")).unwrap_err();
        assert!(err.contains("cannot read '"), "{err}");
        // Size limit.
        let err = p
            .read_image_file(root.join("sub/a.png").to_str().unwrap(), 3)
            .unwrap_err();
        assert!(err.contains("larger than the limit of 3 bytes"), "{err}");

        // Trusted without roots: system directories and non-files are still refused.
        let t = Policy::default();
        let err = t
            .read_image_file("/proc/self/environ", 1 << 20)
            .unwrap_err();
        assert!(err.contains("under /proc"), "{err}");
        let err = t.read_image_file("/dev/zero", 1 << 20).unwrap_err();
        assert!(err.contains("under /dev"), "{err}");
        let fifo = base.join("fifo.png");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = t
            .read_image_file(fifo.to_str().unwrap(), 1 << 20)
            .unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let err = t
            .read_image_file(root.to_str().unwrap(), 1 << 20)
            .unwrap_err();
        assert!(
            err.contains("not a regular file") || err.contains("Is a directory"),
            "{err}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn model_roots_bound_loading_and_writing() {
        let base = std::env::temp_dir().join(format!("archaeclip-models-{}", std::process::id()));
        std::fs::create_dir_all(base.join("models/m")).unwrap();
        std::fs::create_dir_all(base.join("other")).unwrap();
        let p = Policy::decide(&Host {
            model_roots: Some(base.join("models").display().to_string()),
            ..Host::default()
        })
        .unwrap();
        assert!(p.check_model_dir(&base.join("models/m")).is_ok());
        let err = p.check_model_dir(&base.join("other")).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        assert!(p.check_output_dir(&base.join("models/new")).is_ok());
        assert!(p
            .check_output_dir(&base.join("models/../other/new"))
            .is_err());
        let untrusted = Policy {
            level: Level::Untrusted,
            ..p.clone()
        };
        let err = untrusted
            .check_output_dir(&base.join("models/new"))
            .unwrap_err();
        assert!(
            err.contains("writing a model directory (training) is not allowed"),
            "{err}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn restrict_only_narrows_and_only_on_a_trusted_connection() {
        let base = std::env::temp_dir().join(format!("archaeclip-restrict-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        let mut p = Policy::default();
        let a = base.join("a").display().to_string();
        p.restrict(&format!(r#"{{"file_roots": ["{a}"]}}"#))
            .unwrap();
        assert_eq!(p.level, Level::Trusted);
        let err = p
            .restrict(&format!(r#"{{"file_roots": ["{}"]}}"#, base.display()))
            .unwrap_err();
        assert!(err.contains("can only be narrowed"), "{err}");
        let b = base.join("a/b").display().to_string();
        p.restrict(&format!(
            r#"{{"file_roots": ["{b}"], "level": "untrusted"}}"#
        ))
        .unwrap();
        assert_eq!(p.level, Level::Untrusted);
        assert_eq!(p.limits, Limits::UNTRUSTED);
        let err = p.restrict(r#"{"level": "untrusted"}"#).unwrap_err();
        assert!(err.contains("changing the policy is not allowed"), "{err}");
        let err = Policy::default()
            .restrict(r#"{"write": true}"#)
            .unwrap_err();
        assert!(err.contains("unknown key 'write'"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
