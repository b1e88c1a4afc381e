//! The crate's one error enum, for every call across its boundary.
//!
//! Invariant: an error never leaves stored data damaged. Errors that come from bytes on disk name
//! the file (and, for records, the position in the file and the log offset) so that an operator
//! can find them; the log never drops such bytes silently.

use std::io;
use std::path::PathBuf;

use crate::Offset;

/// The result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed on `path`.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A new segment would take the log beyond its disk budget. Nothing was written; appends that
    /// fit the active segment, and all appends after consumption frees a segment, succeed.
    #[error(
        "disk budget of {budget_bytes} bytes exhausted: {allocated_bytes} allocated, {needed_bytes} more needed"
    )]
    DiskBudgetExceeded { budget_bytes: u64, allocated_bytes: u64, needed_bytes: u64 },
    /// The file system had no room for a new segment (`ENOSPC` from `fallocate`). Nothing was
    /// written; the partial file was removed.
    #[error("no space left on the device for {path}")]
    DiskFull { path: PathBuf },
    /// The payload is larger than [`crate::Config::record_len_max_bytes`].
    #[error("record of {len_bytes} bytes exceeds the maximum of {max_bytes} bytes")]
    RecordTooLarge { len_bytes: usize, max_bytes: usize },
    /// A segment's header is not one this crate wrote (bad magic, bad checksum, short file, or
    /// an id that does not match the file name).
    #[error("corrupt segment header in {path}: {reason}")]
    CorruptHeader { path: PathBuf, reason: String },
    /// A segment was written by another format version.
    #[error("unsupported segment format version {version} in {path} (this build reads version {supported})")]
    UnsupportedVersion { path: PathBuf, version: u32, supported: u32 },
    /// A record that is not at the log's torn tail fails its checks: its checksum, or a length
    /// that does not fit the segment, or bytes after the end of a sealed segment.
    #[error("corrupt record in {path} at file position {position} (log offset {offset}): {reason}")]
    CorruptRecord { path: PathBuf, position: u64, offset: Offset, reason: &'static str },
    /// Two segments with consecutive ids do not join: records between them are missing.
    #[error("{path} starts at log offset {found} but the segment before it ends at {expected}: records are missing")]
    SegmentGap { path: PathBuf, expected: Offset, found: Offset },
    /// No record starts at this offset (never written, already deleted, or not a record boundary).
    #[error("no record starts at log offset {offset}")]
    NoRecord { offset: Offset },
    /// A flush on the sync thread failed. After a failed `fsync`/`msync` the kernel's page cache
    /// state is unknown, so the log refuses further appends; reopen it to recover.
    #[error("a flush of the log failed, it refuses writes until reopened: {0}")]
    SyncFailed(String),
    /// The configuration is not usable.
    #[error("invalid storage configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}
