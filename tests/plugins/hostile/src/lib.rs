//! A plugin that misbehaves in the way its `mode` config value names. Each
//! mode is one attack the sandbox must stop or refuse; `ok` and `slow` are
//! well-behaved controls.

use std::hint::black_box;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, config, export_plugin, log, state};

struct Hostile;

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
            other => Err(format!("unknown mode {other}")),
        }
    }
}

export_plugin!(Hostile);
