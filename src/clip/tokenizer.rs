//! CLIP's text tokenizer, with the ids of HuggingFace's `CLIPTokenizerFast`: NFC, `\s+` -> ' ',
//! lowercase; CLIP's split pattern, then byte-level BPE with the `</w>` end-of-word suffix. It is
//! assembled from the `tokenizers` crate, the library the HuggingFace tokenizer runs on.
//!
//! Three sources, in the order a model directory is searched: its `tokenizer.json`, its
//! `vocab.json` + `merges.txt`, or (for weights-only checkpoints) the vocabulary bundled in the
//! binary, open_clip's `bpe_simple_vocab_16e6.txt.gz`, from which the table is built exactly as
//! HuggingFace converted OpenAI's tokenizer. `tests/fixtures/tokenizer/reference.json` holds the
//! HuggingFace ids every source is tested against (`scripts/make_tokenizer_fixtures.py`).
//!
//! The fast tokenizer is the reference. The slow, pure-Python `CLIPTokenizer` (and open_clip)
//! clean the text with ftfy first, so they differ on a few texts: HTML entities (`&amp;`), curly
//! quotes, fullwidth letters, ligatures, control characters, and a word-final capital sigma.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const BUNDLED_NAME: &str = "bpe_simple_vocab_16e6.txt.gz";
const BUNDLED_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 49152 - 256 - 2 merges of the bundled file (its `lines[1:48895]`).
const BUNDLED_MERGES: usize = 49152 - 256 - 2;
/// The `Split` pattern of HuggingFace's CLIP pre-tokenizer (the special tokens never reach it:
/// they are matched first, as added tokens).
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Where a tokenizer's vocabulary came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A HuggingFace `tokenizer.json`.
    TokenizerJson(PathBuf),
    /// A `vocab.json` (token -> id) and a `merges.txt` (BPE merges, in rank order).
    VocabAndMerges { vocab: PathBuf, merges: PathBuf },
    /// The standard CLIP vocabulary compiled into the extension.
    Bundled,
}

impl TokenizerSource {
    /// A short human-readable name: the file names, or the bundled vocabulary's.
    pub fn describe(&self) -> String {
        match self {
            TokenizerSource::TokenizerJson(path) => file_name(path),
            TokenizerSource::VocabAndMerges { vocab, merges } => {
                format!("{} + {}", file_name(vocab), file_name(merges))
            }
            TokenizerSource::Bundled => format!("bundled CLIP BPE vocabulary ({BUNDLED_NAME})"),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A CLIP tokenizer: text -> ids framed by `<|startoftext|>` and `<|endoftext|>`, truncated to
/// `max_len`. Immutable once built, so it can be shared across threads.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    max_len: usize,
    source: TokenizerSource,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl ClipTokenizer {
    /// From a model directory: tokenizer.json if present, else vocab.json + merges.txt, else None.
    /// One of vocab.json and merges.txt without the other is an error, not None: the directory
    /// has its own vocabulary, and falling back to the bundled one could silently give other ids.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Option<ClipTokenizer>> {
        check_max_len(max_len)?;
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_tokenizer_json(&json, max_len).map(Some);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        match (vocab.exists(), merges.exists()) {
            (true, true) => Self::from_vocab_and_merges(&vocab, &merges, max_len).map(Some),
            (false, false) => Ok(None),
            (true, false) => Err(Error::Model(format!(
                "{}: found without merges.txt beside it (a BPE tokenizer needs both)",
                vocab.display()
            ))),
            (false, true) => Err(Error::Model(format!(
                "{}: found without vocab.json beside it (a BPE tokenizer needs both)",
                merges.display()
            ))),
        }
    }

    /// The standard CLIP tokenizer built from open_clip's bpe_simple_vocab_16e6.txt.gz, embedded
    /// in the binary.
    pub fn bundled(max_len: usize) -> Result<ClipTokenizer> {
        check_max_len(max_len)?;
        let tokenizer = bundled_vocab_and_merges()
            .and_then(|(vocab, merges)| clip_pipeline(vocab, merges))
            .map_err(|e| Error::Model(format!("{}: {e}", TokenizerSource::Bundled.describe())))?;
        Self::new(tokenizer, max_len, TokenizerSource::Bundled)
    }

    /// Writes the bundled vocabulary as HuggingFace's slow-tokenizer files (`vocab.json`,
    /// `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`), for a model directory
    /// whose base had no tokenizer files. Returns the file names written.
    pub fn write_bundled_files(dir: &Path, max_len: usize) -> Result<Vec<&'static str>> {
        let fail = |e: String| Error::Io(format!("{}: {e}", dir.display()));
        let (vocab, merges) = bundled_vocab_and_merges().map_err(fail)?;
        let mut ordered: Vec<(&String, &u32)> = vocab.iter().collect();
        ordered.sort_by_key(|(_, id)| **id);
        let vocab_json: serde_json::Map<String, serde_json::Value> = ordered
            .into_iter()
            .map(|(t, id)| (t.clone(), (*id).into()))
            .collect();
        let mut merges_txt = String::from("#version: 0.2\n");
        for (a, b) in &merges {
            merges_txt.push_str(&format!("{a} {b}\n"));
        }
        let special = serde_json::json!({
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        });
        let mut config = special.clone();
        config["tokenizer_class"] = "CLIPTokenizer".into();
        config["model_max_length"] = max_len.into();
        config["do_lower_case"] = true.into();
        let files: [(&'static str, String); 4] = [
            (
                "vocab.json",
                serde_json::Value::Object(vocab_json).to_string(),
            ),
            ("merges.txt", merges_txt),
            ("tokenizer_config.json", format!("{config:#}")),
            ("special_tokens_map.json", format!("{special:#}")),
        ];
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).map_err(|e| fail(format!("{name}: {e}")))?;
        }
        Ok(files.iter().map(|(n, _)| *n).collect())
    }

    fn from_tokenizer_json(path: &Path, max_len: usize) -> Result<ClipTokenizer> {
        let text = read_text(path)?;
        let mut tokenizer: Tokenizer = serde_json::from_str(&text).map_err(|e| {
            let what = if e.is_data() {
                "not a tokenizer definition"
            } else {
                "invalid JSON"
            };
            Error::Model(format!("{}: {what}: {e}", path.display()))
        })?;
        // encode() adds the special tokens and truncates itself; the file's own settings (some
        // pad to 77) must not apply.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        Self::new(
            tokenizer,
            max_len,
            TokenizerSource::TokenizerJson(path.into()),
        )
    }

    fn from_vocab_and_merges(vocab: &Path, merges: &Path, max_len: usize) -> Result<ClipTokenizer> {
        let vocab_map: HashMap<String, u32> =
            serde_json::from_str(&read_text(vocab)?).map_err(|e| {
                let what = if e.is_data() {
                    "not an object of token -> id"
                } else {
                    "invalid JSON"
                };
                Error::Model(format!("{}: {what}: {e}", vocab.display()))
            })?;
        for token in [BOS, EOS] {
            if !vocab_map.contains_key(token) {
                return Err(no_clip_token(&vocab.display().to_string(), token));
            }
        }
        let merge_list = parse_merges(&read_text(merges)?)
            .map_err(|e| Error::Model(format!("{}: {e}", merges.display())))?;
        let tokenizer =
            clip_pipeline(vocab_map.into_iter().collect(), merge_list).map_err(|e| {
                Error::Model(format!("{} + {}: {e}", vocab.display(), merges.display()))
            })?;
        let source = TokenizerSource::VocabAndMerges {
            vocab: vocab.into(),
            merges: merges.into(),
        };
        Self::new(tokenizer, max_len, source)
    }

    fn new(tokenizer: Tokenizer, max_len: usize, source: TokenizerSource) -> Result<ClipTokenizer> {
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| no_clip_token(&source_path(&source), token))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        Ok(ClipTokenizer {
            tokenizer,
            bos,
            eos,
            max_len,
            source,
        })
    }

    /// Ids with <|startoftext|> first and <|endoftext|> last, not padded. A text of more than
    /// max_len tokens keeps its first max_len - 2 and the <|endoftext|>, as HuggingFace's
    /// `tokenizer(text, truncation=True, max_length=max_len)`. The empty string gives [bos, eos].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| {
            Error::Model(format!(
                "tokenizer ({}): cannot tokenize the text: {e}",
                self.source.describe()
            ))
        })?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_len - 2)];
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        Ok(ids)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Distinct tokens, the special ones included (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce, special tokens included: the model's token
    /// embedding must have more rows than this (a tokenizer.json may number its tokens sparsely).
    pub fn max_id(&self) -> u32 {
        self.tokenizer
            .get_vocab(true)
            .into_values()
            .max()
            .unwrap_or(0)
    }

    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }
}

fn check_max_len(max_len: usize) -> Result<()> {
    if max_len < 2 {
        return Err(Error::InvalidArgument {
            what: format!(
                "tokenizer: max_len must be at least 2 (<|startoftext|> and <|endoftext|>), got {max_len}"
            ),
        });
    }
    Ok(())
}

fn no_clip_token(file: &str, token: &str) -> Error {
    Error::Model(format!(
        "{file}: no {token} token in the vocabulary (not a CLIP tokenizer?)"
    ))
}

fn source_path(source: &TokenizerSource) -> String {
    match source {
        TokenizerSource::TokenizerJson(path) => path.display().to_string(),
        TokenizerSource::VocabAndMerges { vocab, .. } => vocab.display().to_string(),
        TokenizerSource::Bundled => TokenizerSource::Bundled.describe(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Model(format!("{}: cannot read: {e}", path.display())))
}

/// merges.txt: an optional `#version` header, then one merge per line, two symbols separated by
/// a space, in rank order. Blank lines are skipped.
fn parse_merges(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(format!(
                    "line {}: expected two space-separated symbols, found {line:?}",
                    index + 1
                ))
            }
        }
    }
    Ok(merges)
}

/// The vocabulary and merges of OpenAI's CLIP tokenizer, built from the bundled BPE file as
/// open_clip and HuggingFace's conversion do: the 256 byte symbols, the same with `</w>`, each
/// merge joined, then <|startoftext|> and <|endoftext|>.
fn bundled_vocab_and_merges() -> std::result::Result<(Vocab, Vec<(String, String)>), String> {
    let reader = BufReader::new(flate2::read::GzDecoder::new(BUNDLED_BPE_GZ));
    let mut lines = reader.lines();
    lines
        .next()
        .ok_or("empty file")?
        .map_err(|e| format!("cannot decompress: {e}"))?;
    let mut merges = Vec::with_capacity(BUNDLED_MERGES);
    for (index, line) in lines.take(BUNDLED_MERGES).enumerate() {
        let line = line.map_err(|e| format!("cannot decompress: {e}"))?;
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned())),
            _ => return Err(format!("line {}: not a merge: {line:?}", index + 2)),
        }
    }
    if merges.len() != BUNDLED_MERGES {
        return Err(format!(
            "{} merges, CLIP needs {BUNDLED_MERGES}",
            merges.len()
        ));
    }

    let bytes = byte_symbols();
    let tokens = bytes
        .iter()
        .map(|c| c.to_string())
        .chain(bytes.iter().map(|c| format!("{c}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([BOS.to_owned(), EOS.to_owned()]);
    let vocab: Vocab = tokens.zip(0u32..).collect();
    Ok((vocab, merges))
}

/// GPT-2's byte -> printable character table, in its order: the printable Latin-1 bytes map to
/// themselves, the other 68 bytes (in increasing order) to U+0100 onwards.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut symbols: Vec<char> = (0..=255u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    symbols.extend(
        (0..=255u32)
            .filter(|&b| !printable(b))
            .zip(0x100u32..)
            .filter_map(|(_, c)| char::from_u32(c)),
    );
    symbols
}

/// The pipeline of HuggingFace's CLIPTokenizerFast (as in the hub's tokenizer.json files) around
/// a BPE model. The special tokens are `normalized`, as there: `<|ENDOFTEXT|>` matches too.
fn clip_pipeline(
    vocab: Vocab,
    merges: Vec<(String, String)>,
) -> std::result::Result<Tokenizer, String> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(EOS.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .fuse_unk(false)
        .build()
        .map_err(|e| e.to_string())?;
    let whitespace =
        Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ").map_err(|e| e.to_string())?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| e.to_string())?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| e.to_string())?
        .with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            // add_prefix_space false, trim_offsets and use_regex true, as in the hub's files.
            ByteLevel::new(false, true, true).into(),
        ])));
    tokenizer
        .add_special_tokens(vec![
            AddedToken::from(BOS, true).normalized(true),
            AddedToken::from(EOS, true).normalized(true),
        ])
        .map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MAX_LEN: usize = 77;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
    }

    struct Case {
        name: String,
        text: String,
        ids: Vec<u32>,
    }

    fn reference() -> Vec<Case> {
        let path = fixture_dir().join("reference.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["max_length"], MAX_LEN);
        let cases: Vec<Case> = json["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Case {
                name: c["name"].as_str().unwrap().to_owned(),
                text: c["text"].as_str().unwrap().to_owned(),
                ids: serde_json::from_value(c["ids"].clone()).unwrap(),
            })
            .collect();
        assert!(cases.len() >= 60, "{} cases", cases.len());
        cases
    }

    fn assert_reference(tokenizer: &ClipTokenizer) {
        assert_eq!(tokenizer.bos_id(), 49406);
        assert_eq!(tokenizer.eos_id(), 49407);
        assert_eq!(tokenizer.vocab_size(), 49408);
        let mut failures = Vec::new();
        for case in reference() {
            let ids = tokenizer.encode(&case.text).unwrap();
            if ids != case.ids {
                failures.push(format!(
                    "{} {:?}:\n  got  {ids:?}\n  want {:?}",
                    case.name, case.text, case.ids
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{}: {} mismatches:\n{}",
            tokenizer.source().describe(),
            failures.len(),
            failures.join("\n")
        );
    }

    /// A scratch directory under the system temp dir, removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> ScratchDir {
            let dir = std::env::temp_dir().join(format!(
                "archaeclip-tokenizer-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            ScratchDir(dir)
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn copy_fixture(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::copy(fixture_dir().join(name), &path).unwrap();
            path
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn model_error(result: Result<Option<ClipTokenizer>>) -> String {
        match result {
            Err(Error::Model(message)) => message,
            other => panic!("expected Error::Model, got {other:?}"),
        }
    }

    #[test]
    fn tokenizer_json_matches_huggingface() {
        let tokenizer = ClipTokenizer::from_dir(&fixture_dir(), MAX_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(
            tokenizer.source(),
            &TokenizerSource::TokenizerJson(fixture_dir().join("tokenizer.json"))
        );
        assert_eq!(tokenizer.source().describe(), "tokenizer.json");
        assert_reference(&tokenizer);
    }

    #[test]
    fn vocab_and_merges_match_huggingface() {
        let dir = ScratchDir::new("vocab-merges");
        let vocab = dir.copy_fixture("vocab.json");
        let merges = dir.copy_fixture("merges.txt");
        let tokenizer = ClipTokenizer::from_dir(&dir.0, MAX_LEN).unwrap().unwrap();
        assert_eq!(
            tokenizer.source(),
            &TokenizerSource::VocabAndMerges { vocab, merges }
        );
        assert_eq!(tokenizer.source().describe(), "vocab.json + merges.txt");
        assert_reference(&tokenizer);
    }

    #[test]
    fn bundled_matches_huggingface() {
        let tokenizer = ClipTokenizer::bundled(MAX_LEN).unwrap();
        assert_eq!(tokenizer.source(), &TokenizerSource::Bundled);
        assert_eq!(
            tokenizer.source().describe(),
            "bundled CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)"
        );
        assert_reference(&tokenizer);
    }

    #[test]
    fn bundled_vocabulary_is_the_fixture_vocabulary() {
        let (vocab, merges) = bundled_vocab_and_merges().unwrap();
        let fixture: HashMap<String, u32> = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir().join("vocab.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(vocab.len(), 49408);
        assert!(fixture
            .iter()
            .all(|(token, id)| vocab.get(token) == Some(id)));
        let fixture_merges =
            parse_merges(&std::fs::read_to_string(fixture_dir().join("merges.txt")).unwrap())
                .unwrap();
        assert_eq!(merges, fixture_merges);
    }

    #[test]
    fn truncation_keeps_eos_at_any_max_len() {
        let long = reference()
            .into_iter()
            .find(|c| c.name == "long_200_words")
            .unwrap();
        assert_eq!(long.ids.len(), MAX_LEN);
        for max_len in [2, 3, 10, 76] {
            let tokenizer = ClipTokenizer::bundled(max_len).unwrap();
            // bos and the first max_len - 2 tokens, then eos.
            let mut want = long.ids[..max_len - 1].to_vec();
            want.push(49407);
            assert_eq!(
                tokenizer.encode(&long.text).unwrap(),
                want,
                "max_len {max_len}"
            );
            assert_eq!(tokenizer.encode("").unwrap(), [49406, 49407]);
        }
        let wide = ClipTokenizer::bundled(1000).unwrap();
        let ids = wide.encode(&long.text).unwrap();
        assert!(ids.len() > MAX_LEN);
        assert_eq!(ids[..MAX_LEN - 1], long.ids[..MAX_LEN - 1]);
        assert_eq!(ids.last(), Some(&49407));
    }

    #[test]
    fn max_len_below_two_is_refused() {
        for (result, max_len) in [
            (ClipTokenizer::bundled(1).map(Some), 1),
            (ClipTokenizer::from_dir(&fixture_dir(), 0), 0),
        ] {
            match result {
                Err(Error::InvalidArgument { what }) => assert_eq!(
                    what,
                    format!("tokenizer: max_len must be at least 2 (<|startoftext|> and <|endoftext|>), got {max_len}")
                ),
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClipTokenizer>();
        let tokenizer = Arc::new(ClipTokenizer::bundled(MAX_LEN).unwrap());
        let cases = Arc::new(reference());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (tokenizer, cases) = (Arc::clone(&tokenizer), Arc::clone(&cases));
                std::thread::spawn(move || {
                    for case in cases.iter().skip(t).step_by(2) {
                        assert_eq!(
                            tokenizer.encode(&case.text).unwrap(),
                            case.ids,
                            "{}",
                            case.name
                        );
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn directory_without_tokenizer_files_gives_none() {
        let dir = ScratchDir::new("empty");
        dir.write("config.json", b"{}");
        assert!(ClipTokenizer::from_dir(&dir.0, MAX_LEN).unwrap().is_none());
        let missing = dir.0.join("no-such-dir");
        assert!(ClipTokenizer::from_dir(&missing, MAX_LEN)
            .unwrap()
            .is_none());
    }

    #[test]
    fn tokenizer_json_wins_over_vocab_and_merges() {
        let dir = ScratchDir::new("both");
        dir.copy_fixture("tokenizer.json");
        dir.write("vocab.json", b"not json");
        dir.write("merges.txt", b"not merges");
        let tokenizer = ClipTokenizer::from_dir(&dir.0, MAX_LEN).unwrap().unwrap();
        assert_eq!(tokenizer.source().describe(), "tokenizer.json");
    }

    #[test]
    fn corrupt_tokenizer_json_is_reported() {
        let dir = ScratchDir::new("bad-json");
        let path = dir.write("tokenizer.json", br#"{"version": "1.0", "model": {"#);
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!(
                "{}: invalid JSON: EOF while parsing",
                path.display()
            )),
            "{message}"
        );
        assert!(message.contains("line 1 column"), "{message}");

        dir.write("tokenizer.json", br#"{"version": "1.0", "model": 3}"#);
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!("{}: not a tokenizer definition: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn tokenizer_json_without_clip_tokens_is_reported() {
        let dir = ScratchDir::new("not-clip");
        let path = dir.write(
            "tokenizer.json",
            br#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                 "normalizer": null, "pre_tokenizer": null, "post_processor": null,
                 "decoder": null,
                 "model": {"type": "BPE", "dropout": null, "unk_token": null,
                           "continuing_subword_prefix": null, "end_of_word_suffix": null,
                           "fuse_unk": false, "byte_fallback": false,
                           "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}"#,
        );
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{}: no <|startoftext|> token in the vocabulary (not a CLIP tokenizer?)",
                path.display()
            )
        );
    }

    #[test]
    fn unreadable_tokenizer_json_is_reported() {
        let dir = ScratchDir::new("unreadable");
        let path = dir.0.join("tokenizer.json");
        std::fs::create_dir(&path).unwrap();
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!("{}: cannot read: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn half_a_vocab_and_merges_pair_is_reported() {
        let dir = ScratchDir::new("half-pair");
        let vocab = dir.copy_fixture("vocab.json");
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{}: found without merges.txt beside it (a BPE tokenizer needs both)",
                vocab.display()
            )
        );
        std::fs::remove_file(&vocab).unwrap();
        let merges = dir.copy_fixture("merges.txt");
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{}: found without vocab.json beside it (a BPE tokenizer needs both)",
                merges.display()
            )
        );
    }

    #[test]
    fn corrupt_vocab_json_is_reported() {
        let dir = ScratchDir::new("bad-vocab");
        dir.copy_fixture("merges.txt");
        let vocab = dir.write("vocab.json", br#"{"a": 0, "b": "#);
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!("{}: invalid JSON: ", vocab.display())),
            "{message}"
        );
        assert!(message.contains("line 1 column"), "{message}");

        dir.write("vocab.json", br#"{"a": 0, "b": "one"}"#);
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!(
                "{}: not an object of token -> id: invalid type: string \"one\"",
                vocab.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn corrupt_merges_txt_is_reported() {
        let dir = ScratchDir::new("bad-merges");
        let vocab = dir.copy_fixture("vocab.json");
        let merges = dir.write("merges.txt", b"#version: 0.2\ni n\nt h e\n");
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{}: line 3: expected two space-separated symbols, found \"t h e\"",
                merges.display()
            )
        );

        dir.write("merges.txt", b"#version: 0.2\ni n\nq \xce\xa9\n");
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{} + {}: Token `\u{3a9}` out of vocabulary",
                vocab.display(),
                merges.display()
            )
        );

        dir.write("merges.txt", b"i n\n\xff\xfe\n");
        let message = model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN));
        assert!(
            message.starts_with(&format!("{}: cannot read: ", merges.display())),
            "{message}"
        );
    }

    #[test]
    fn vocab_without_clip_tokens_is_reported() {
        let dir = ScratchDir::new("vocab-not-clip");
        let vocab = dir.write(
            "vocab.json",
            br#"{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}"#,
        );
        dir.write("merges.txt", b"#version: 0.2\na b\n");
        assert_eq!(
            model_error(ClipTokenizer::from_dir(&dir.0, MAX_LEN)),
            format!(
                "{}: no <|startoftext|> token in the vocabulary (not a CLIP tokenizer?)",
                vocab.display()
            )
        );
    }
}
