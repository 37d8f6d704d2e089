//! Exit codes, after BSD `sysexits.h`, so scripts and systemd can tell a
//! bad config from a bad input from a failed plugin.

use std::process::ExitCode;

/// Success.
pub const OK: u8 = 0;
/// The plugin ran and failed (trap, timeout, limit, `err`).
pub const PLUGIN_FAILED: u8 = 1;
/// The command was used wrongly (a missing or bad argument or input).
pub const EX_USAGE: u8 = 64;
/// Input data was malformed (e.g. an event JSON file).
pub const EX_DATAERR: u8 = 65;
/// An input file did not exist or was not readable.
pub const EX_NOINPUT: u8 = 66;
/// A tool the command needs is not installed.
pub const EX_UNAVAILABLE: u8 = 69;
/// Something the command needs from the system failed.
pub const EX_SOFTWARE: u8 = 70;
/// A resource is busy (e.g. another process delivers from the outbox).
pub const EX_TEMPFAIL: u8 = 75;
/// The configuration is invalid.
pub const EX_CONFIG: u8 = 78;

/// An error with the exit code it should produce.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    /// The exit code.
    pub code: u8,
    /// What to print.
    pub message: String,
}

/// Shorthand for an error carrying an exit code.
pub fn coded(code: u8, message: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error: its own if it carries one, else 70.
pub fn code_for(err: &anyhow::Error) -> ExitCode {
    let code = err
        .chain()
        .find_map(|e| e.downcast_ref::<Coded>().map(|c| c.code))
        .unwrap_or(EX_SOFTWARE);
    ExitCode::from(code)
}

/// A closed stdout (`sendbox ... | head`) is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
