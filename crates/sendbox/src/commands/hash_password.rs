//! `sendbox hash-password`: a password hash for an SMTP listener's
//! `users_file`, from a password read on standard input (one line).
//!
//! ```text
//! read -rs PW && printf '%s\n' "$PW" | sendbox hash-password --user scanner >> /etc/sendbox/listener-users
//! ```

use std::io::BufRead;
use std::process::ExitCode;

use clap::Args;

use crate::exit::{self, coded};

/// `sendbox hash-password [--user NAME]`
#[derive(Debug, Args)]
pub struct HashPasswordArgs {
    /// Print `NAME:HASH`, a line for the users file, instead of the hash.
    #[arg(long)]
    pub user: Option<String>,
}

impl HashPasswordArgs {
    /// Reads the password, prints the hash.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(coded(
                exit::EX_USAGE,
                "no password on standard input; pipe one line, e.g. `printf '%s\\n' \"$PW\" | sendbox hash-password`",
            ));
        }
        if let Some(user) = &self.user
            && (user.is_empty() || user.contains([':', '\n', '\r']))
        {
            return Err(coded(
                exit::EX_USAGE,
                "--user must be non-empty and hold no `:` or line break",
            ));
        }
        let hash = sendbox_submission::PasswordHash::create(password)?;
        match self.user {
            Some(user) => println!("{user}:{hash}"),
            None => println!("{hash}"),
        }
        Ok(ExitCode::SUCCESS)
    }
}
