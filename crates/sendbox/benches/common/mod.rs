//! What the daemon benchmarks share: `sendbox run` as a child process,
//! started on a config and stopped (SIGTERM) when dropped, and its memory
//! as `/proc` reports it. Each benchmark uses part of it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sendbox run`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`, from the ready line.
    pub base: String,
    /// From spawning the process to its ready line.
    pub ready: Duration,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts `sendbox run --config CONFIG` (logging warnings only) and waits
/// for its ready line.
pub fn start(config: &Path) -> Daemon {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["run", "--config"])
        .arg(config)
        .env("SENDBOX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sendbox starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a ready line");
    let ready = started.elapsed();
    assert!(line.contains("sendbox ready"), "{line:?}");
    let base = sendbox_test_support::webhook_base(&line);
    Daemon { child, base, ready }
}

/// One memory line of `/proc/PID/status` (`VmRSS`, `VmHWM`, `RssAnon`...),
/// in MB.
pub fn memory_mb(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc (Linux)");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// The median of some runs' figures (the mean of the middle two when
/// their number is even).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
