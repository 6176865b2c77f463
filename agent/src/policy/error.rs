use std::path::PathBuf;

use thiserror::Error;

use super::locate::Location;

/// Why a policy file was refused. Every message starts with the file, and, once the text is
/// TOML, the line, the rule and the key.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML is UTF-8; these bytes are not.
    #[error("{}: not valid UTF-8 (byte {offset})", .path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The text is not TOML at all.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    /// The text is TOML but not a policy: an unknown, missing or mistyped key, a value out of
    /// range, a contradiction between keys, a duplicate rule name.
    #[error("{}:{at}: {message}", .path.display())]
    Invalid { path: PathBuf, at: Location, message: String },
}
