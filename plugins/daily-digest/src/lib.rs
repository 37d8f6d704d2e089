//! daily-digest: records every file and webhook event it sees in its state;
//! on a schedule tick it sends one digest of everything recorded and clears
//! the record. A tick with nothing recorded sends nothing.
//!
//! Config: `to` (required, comma-separated), `subject` (default
//! `Digest: {count} events`; `{count}` and `{schedule}` are replaced),
//! `max_entries` (default 1000: older entries are dropped first, and the
//! digest says how many).

use sendbox_pdk::{
    Email, FileEvent, HttpRequest, Outcome, Plugin, Tick, config, export_plugin, log, state,
};
use serde::{Deserialize, Serialize};

struct DailyDigest;

const ENTRY_PREFIX: &str = "entry/";
const SEQ_KEY: &str = "seq";
const DROPPED_KEY: &str = "dropped";

#[derive(Serialize, Deserialize)]
struct Entry {
    /// Milliseconds since the Unix epoch when the event was recorded.
    at_ms: u64,
    what: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn record(what: String) -> Result<Outcome, String> {
    let seq: u64 = state::get_json(SEQ_KEY)?.unwrap_or(0);
    // Zero-padded so keys sort in arrival order.
    state::set_json(
        &format!("{ENTRY_PREFIX}{seq:012}"),
        &Entry {
            at_ms: now_ms(),
            what,
        },
    )?;
    state::set_json(SEQ_KEY, &(seq + 1))?;
    let max: usize = config::parse("max_entries")?.unwrap_or(1000);
    let keys = state::keys(ENTRY_PREFIX);
    if keys.len() > max {
        let excess = keys.len() - max;
        for k in &keys[..excess] {
            state::delete(k);
        }
        let dropped: u64 = state::get_json(DROPPED_KEY)?.unwrap_or(0);
        state::set_json(DROPPED_KEY, &(dropped + excess as u64))?;
    }
    Ok(Outcome::none())
}

impl Plugin for DailyDigest {
    fn on_file(event: FileEvent) -> Result<Outcome, String> {
        let size = event
            .size
            .map(|s| format!(" ({s} bytes)"))
            .unwrap_or_default();
        record(format!(
            "file {} in {}: {}{size}",
            event.change.as_str(),
            event.watch,
            event.path
        ))
    }

    fn on_webhook(req: HttpRequest) -> Result<Outcome, String> {
        record(format!(
            "webhook {} {} ({} bytes)",
            req.method,
            req.path,
            req.body.len()
        ))
    }

    fn on_schedule(tick: Tick) -> Result<Outcome, String> {
        let keys = state::keys(ENTRY_PREFIX);
        if keys.is_empty() {
            log::debug("nothing recorded; no digest sent");
            return Ok(Outcome::none());
        }
        let to = config::get("to").ok_or("config `to` is missing: set the recipient address")?;
        let dropped: u64 = state::get_json(DROPPED_KEY)?.unwrap_or(0);
        let mut text = format!("{} events since the last digest:\n\n", keys.len());
        for k in &keys {
            let entry: Entry = state::get_json(k)?.ok_or("entry vanished")?;
            text.push_str(&format!("- {} {}\n", format_time(entry.at_ms), entry.what));
            state::delete(k);
        }
        if dropped > 0 {
            text.push_str(&format!(
                "\n{dropped} older events were dropped (max_entries).\n"
            ));
        }
        state::delete(DROPPED_KEY);
        state::delete(SEQ_KEY);
        let subject = config::get_or("subject", "Digest: {count} events")
            .replace("{count}", &keys.len().to_string())
            .replace("{schedule}", &tick.schedule);
        let mut recipients = to.split(',').map(str::trim).filter(|s| !s.is_empty());
        let mut email = Email::to(recipients.next().ok_or("config `to` is empty")?);
        for r in recipients {
            email = email.to(r);
        }
        let email = email
            .subject(subject)
            .text(text)
            .idempotency_key(format!("digest:{}:{}", tick.schedule, tick.scheduled_at_ms))
            .build();
        Ok(Outcome::email(email))
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` without a date library.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

export_plugin!(DailyDigest);
