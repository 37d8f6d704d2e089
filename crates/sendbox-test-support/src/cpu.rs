//! CPU time read from `/proc` (user + system, 10 ms ticks): benchmarks
//! report CPU per request or message, which varies far less between runs
//! on a shared machine than requests per second do.

use std::time::Duration;

/// This process's CPU time so far.
pub fn process() -> Duration {
    of_stat("/proc/self/stat")
}

/// The CPU time so far of process `pid`.
fn of_process(pid: &str) -> Duration {
    of_stat(&format!("/proc/{pid}/stat"))
}

/// The CPU time so far of this process's threads whose name starts with
/// `prefix` (Linux keeps the first 15 bytes of a thread's name).
pub fn threads_named(prefix: &str) -> Duration {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with(prefix))
        })
        .map(|t| of_stat(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// The CPU time so far of every process named `name` (`node` for the
/// peers).
pub fn processes_named(name: &str) -> Duration {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|e| of_process(&e.file_name().to_string_lossy()))
        .sum()
}

fn of_stat(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: 11 and 12 counted from the
    // state (field 3) at 0. Counted by position: some fields before them
    // (the terminal's process group) are -1.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    /// A busy loop of ~200 ms shows as at least 150 ms of this process's
    /// CPU time (user time, which the fields before it must not hide).
    #[test]
    fn a_busy_loop_is_counted() {
        let before = super::process();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let used = super::process() - before;
        assert!(used >= std::time::Duration::from_millis(150), "{used:?}");
    }
}
