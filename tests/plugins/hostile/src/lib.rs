//! A plugin that misbehaves in the way its `mode` config value names. Each
//! mode is one attack the sandbox must stop or refuse; `ok` and `slow` are
//! well-behaved controls.

use std::hint::black_box;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, config, export_plugin, log, state};

struct Hostile;

/// `wasi:random` imported directly, to ask for more bytes than the host
/// hands out in one call.
mod random {
    sendbox_pdk::__wit_bindgen::generate!({
        inline: "package wasi:random@0.2.0;
                 interface random { get-random-bytes: func(len: u64) -> list<u8>; get-random-u64: func() -> u64; }
                 world r { import random; }",
        runtime_path: "sendbox_pdk::__wit_bindgen::rt",
    });
}

static EVENTS: AtomicU64 = AtomicU64::new(0);
static BIG: [AtomicU8; 2 << 20] = [const { AtomicU8::new(0) }; 2 << 20];

fn ok_email(subject: &str, body: String) -> Outcome {
    Outcome::email(
        Email::to("ok@example.com")
            .subject(subject)
            .text(body)
            .build(),
    )
}

#[inline(never)]
#[allow(unconditional_recursion)] // the point: recurse until the stack runs out
fn recurse(depth: u64, pad: [u8; 64]) -> u64 {
    let pad = black_box(pad);
    black_box(recurse(depth + 1, pad)) + u64::from(pad[(depth % 64) as usize])
}

impl Plugin for Hostile {
    fn on_webhook(req: HttpRequest) -> Result<Outcome, String> {
        let mode = config::get_or("mode", "ok");
        match mode.as_str() {
            "ok" => Ok(ok_email("ok", format!("handled {}", req.path))),
            // Looks for what an earlier event left in memory: a counter,
            // and bytes low and high in a 2 MiB static. A fresh instance
            // per event reports "events=1 low=0 high=0" every time.
            "leftovers" => {
                let n = EVENTS.fetch_add(1, Ordering::Relaxed) + 1;
                let low = BIG[100].swap(7, Ordering::Relaxed);
                let high = BIG[BIG.len() - 100].swap(9, Ordering::Relaxed);
                Ok(ok_email(
                    &format!("events={n} low={low} high={high}"),
                    "x".into(),
                ))
            }
            // Not an attack: takes `sleep_ms` and answers with `label`, for
            // tests of what happens to events in flight.
            "slow" => {
                let ms: u64 = config::get_or("sleep_ms", "500").parse().unwrap_or(500);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                let label = config::get_or("label", "slow");
                Ok(ok_email(
                    &label,
                    format!("handled {} after {ms} ms", req.path),
                ))
            }
            // Waits `sleep_ms`, then computes forever: CPU time must be
            // counted across the wait.
            "nap-then-loop" => {
                let ms: u64 = config::get_or("sleep_ms", "100").parse().unwrap_or(100);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "recursion" => Ok(ok_email("deep", recurse(0, [1; 64]).to_string())),
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                let args: Vec<String> = std::env::args().collect();
                let cwd = std::env::current_dir().map(|p| p.display().to_string());
                Ok(ok_email(
                    "env",
                    format!("vars={vars:?} args={args:?} cwd={cwd:?}"),
                ))
            }
            "passwd" => match std::fs::read_to_string("/etc/passwd") {
                Ok(contents) => Ok(ok_email("passwd", contents)),
                Err(e) => Err(format!("cannot read /etc/passwd: {e}")),
            },
            "emails" => {
                let e = Email::to("ok@example.com").subject("many").build();
                Ok(Outcome::emails(vec![e; 100_000]))
            }
            // Not an attack: an outcome of `kib` KiB (one email's text),
            // for tests of outcomes waiting for their commit.
            "big-outcome" => {
                let kib: usize = config::get_or("kib", "1024").parse().unwrap_or(1024);
                Ok(ok_email("big-outcome", "x".repeat(kib << 10)))
            }
            "big-string" => Ok(ok_email("big", "x".repeat(50 << 20))),
            "crlf-subject" => Ok(Outcome::email(
                Email::to("ok@example.com")
                    .subject("hello\r\nBcc: victim@example.com")
                    .text("x")
                    .build(),
            )),
            "crlf-header" => Ok(Outcome::email(
                Email::to("ok@example.com")
                    .subject("hello")
                    .header("X-Note", "a\r\nBcc: victim@example.com")
                    .text("x")
                    .build(),
            )),
            "panic" => panic!("hostile plugin panicked on purpose"),
            "state-then-fail" => {
                state::set("leak", b"must not persist")?;
                Err("failing after a state write".into())
            }
            "state-then-trap" => {
                state::set("leak", b"must not persist")?;
                panic!("trapping after a state write");
            }
            "state-hog" => {
                let big = vec![7u8; 2 << 20];
                state::set("hog", &big)?;
                Ok(ok_email("stored", "2 MiB stored".into()))
            }
            "log-flood" => {
                let line = "y".repeat(1000);
                for _ in 0..10_000 {
                    log::info(&line);
                    println!("{line}");
                }
                Ok(ok_email("flooded", "logged a lot".into()))
            }
            // Not an attack: reads a counter, waits `sleep_ms`, writes it
            // back plus one. Concurrent events must still count every one.
            "counter" => {
                let n: u64 = state::get("n")
                    .map(|v| String::from_utf8_lossy(&v).parse().unwrap_or(0))
                    .unwrap_or(0);
                let ms: u64 = config::get_or("sleep_ms", "20").parse().unwrap_or(20);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                state::set("n", (n + 1).to_string().as_bytes())?;
                Ok(ok_email(&format!("n={}", n + 1), "counted".into()))
            }
            // Huge keys on every state call: the host must not keep them.
            "huge-keys" => {
                let key = "k".repeat(15 << 20);
                for _ in 0..40 {
                    state::delete(&key);
                    black_box(state::get(&key));
                    black_box(state::keys(&key));
                }
                Ok(ok_email("huge-keys", "done".into()))
            }
            // Many keys with NUL in them: each must be refused (a store may
            // not count them), none stored.
            "nul-keys" => {
                let value = vec![1u8; 200];
                let mut refused = 0;
                for i in 0..4000 {
                    if state::set(&format!("\0{i}"), &value).is_err() {
                        refused += 1;
                    }
                }
                Ok(ok_email(&format!("refused={refused}"), "nul".into()))
            }
            // Deletes of keys that exist nowhere: nothing to hold.
            "delete-flood" => {
                for i in 0..200_000 {
                    state::delete(&format!("nothing-{i}"));
                }
                Ok(ok_email("delete-flood", "done".into()))
            }
            "big-error" => Err("x".repeat(8 << 20)),
            "random-64m" => {
                let bytes = random::wasi::random::random::get_random_bytes(64 << 20);
                Ok(ok_email("random", bytes.len().to_string()))
            }
            other => Err(format!("unknown mode {other}")),
        }
    }
}

export_plugin!(Hostile);
