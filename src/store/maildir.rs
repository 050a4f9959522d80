//! Maildir: names, header block, directory set-up. The I/O of a commit is planned here and
//! performed by the worker through the ring (see `store` module docs).
use std::ffi::CString;

/// One message ready to be written.
#[derive(Debug)]
pub struct Prepared {
    /// Unique across workers and restarts; used in Received: and in the 250 reply.
    pub queue_id: String,
    /// Absolute path in tmp/.
    pub tmp_path: CString,
    /// Absolute path in new/.
    pub new_path: CString,
    /// Return-Path, X-Envelope-To lines, Received: header; each line CRLF-terminated.
    pub header: Vec<u8>,
}
