//! The core's one error type. It knows nothing of SQLite: the `sql` layer prefixes each message
//! with the function and argument it came from (`vec_cosine(): 2nd argument: ...`).

use std::fmt;

/// Everything the pure core can refuse.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A vector with no elements.
    EmptyVector,
    /// A float32 blob whose byte length is not a multiple of 4.
    BlobLength { len: usize },
    /// JSON text that is not a flat array of numbers; `detail` says where it went wrong.
    Json { detail: String },
    /// A JSON array longer than the configured maximum.
    TooManyDimensions { found: usize, max: usize },
    /// A NaN or infinite element (at `index`, 0-based).
    NonFinite { index: usize },
    /// Two vectors of different lengths.
    DimensionMismatch { left: usize, right: usize },
    /// Two vectors of different element types (float32, int8, bit).
    ElementTypeMismatch {
        left: &'static str,
        right: &'static str,
    },
    /// An operation that is not defined for this element type.
    UnsupportedElementType {
        op: &'static str,
        element: &'static str,
    },
    /// A bit vector whose dimensions are not a multiple of 8.
    BitLength { dims: usize },
    /// A value that is out of its allowed range or set (`what` names it).
    InvalidArgument { what: String },
    /// A value of the wrong SQL type (`expected` names what would do).
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    /// A query whose dimensions differ from those of the vectors searched.
    QueryDimensionMismatch { query: usize, rows: usize },
    /// A model directory, config, weights file or tokenizer that cannot be used (the message
    /// names the file and what is wrong with it).
    Model(String),
    /// Image bytes or an image file that cannot be decoded or is refused (too large, ...).
    Image(String),
    /// An error in one row of a set of vectors, named by its id.
    InRow { id: i64, error: Box<Error> },
    /// Training options that are refused (the message names the option).
    Options(String),
    /// Training that cannot go on (the message says why).
    Training(String),
    /// A file or directory that cannot be read or written (the message names it).
    Io(String),
    /// SQLite's interrupt (Ctrl-C in the shell) stopped the work.
    Interrupted,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::EmptyVector => f.write_str("zero-length vectors are not supported"),
            Error::BlobLength { len } => write!(
                f,
                "invalid float32 vector BLOB: length {len} is not a multiple of 4"
            ),
            Error::Json { detail } => write!(f, "invalid JSON vector: {detail}"),
            Error::TooManyDimensions { found, max } => write!(
                f,
                "vector has {found} dimensions, more than the maximum of {max}"
            ),
            Error::NonFinite { index } => {
                write!(f, "element {index} is NaN or infinite; vectors must be finite")
            }
            Error::DimensionMismatch { left, right } => write!(
                f,
                "dimension mismatch: {left} vs {right} (the first vector has {left} dimensions, this one {right})"
            ),
            Error::ElementTypeMismatch { left, right } => write!(
                f,
                "element type mismatch: the first vector is {left}, this one is {right}"
            ),
            Error::UnsupportedElementType { op, element } => {
                write!(f, "{op} is not supported for {element} vectors")
            }
            Error::BitLength { dims } => write!(
                f,
                "binary quantization needs a dimension count divisible by 8, found {dims}"
            ),
            Error::InvalidArgument { what } => f.write_str(what),
            Error::WrongType { expected, found } => write!(f, "expected {expected}, found {found}"),
            Error::QueryDimensionMismatch { query, rows } => write!(
                f,
                "the query vector has {query} dimensions, the statement's vectors have {rows}"
            ),
            Error::Model(what)
            | Error::Image(what)
            | Error::Options(what)
            | Error::Training(what)
            | Error::Io(what) => f.write_str(what),
            Error::Interrupted => f.write_str("interrupted"),
            Error::InRow { id, error } => write!(f, "row with id {id}: {error}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
