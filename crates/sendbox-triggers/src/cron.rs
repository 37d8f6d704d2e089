//! The schedule trigger: cron expressions in an IANA time zone.
//!
//! Expressions take 5 fields (`min hour day month weekday`, as in crontab)
//! or 6 with seconds first. Times are computed in the schedule's zone, so
//! `0 8 * * *` in `Europe/Berlin` fires at 08:00 local time on both sides of
//! a daylight-saving change. A schedule's runs never overlap: the next run
//! is computed only after the previous one finished, so runs missed while
//! busy are skipped. Runs missed while the daemon was down are skipped, or
//! with [`CatchUp::Once`] the latest of them runs once at start (the caller
//! keeps the time of the last run and passes it to [`run`]).

use std::str::FromStr;

use chrono::Utc;
use chrono_tz::Tz;
use sendbox_types::{Event, Tick};

use crate::{Dispatch, Job, new_event_id};

/// The trigger's name in config, logs and metrics.
pub const TYPE: &str = "schedule";

/// One schedule of one plugin.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The plugin.
    pub plugin: String,
    /// The schedule's name, passed in the tick.
    pub name: String,
    /// The parsed expression.
    pub cron: cron::Schedule,
    /// The time zone.
    pub tz: Tz,
    /// What to do about runs missed while the daemon was down.
    pub catch_up: CatchUp,
}

/// Runs missed while the daemon was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Forget them; the next run is the next one due.
    #[default]
    Skip,
    /// Run the latest missed one once, at start.
    Once,
}

impl std::str::FromStr for CatchUp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(CatchUp::Skip),
            "once" => Ok(CatchUp::Once),
            other => Err(format!(
                "catch_up {other:?} is not one of \"skip\" (forget runs missed while down) or \"once\" (run the latest missed one at start)"
            )),
        }
    }
}

/// Parses an expression and a zone, with a message naming the fix.
pub fn parse(expr: &str, tz: &str) -> Result<(cron::Schedule, Tz), String> {
    Ok((parse_expr(expr)?, parse_zone(tz)?))
}

/// Parses an IANA zone name, with a message naming the fix.
pub fn parse_zone(tz: &str) -> Result<Tz, String> {
    Tz::from_str(tz).map_err(|_| {
        format!("timezone {tz:?} is not an IANA zone name like \"UTC\" or \"Europe/Berlin\"")
    })
}

/// Parses a cron expression of 5 fields, or 6 with seconds first.
pub fn parse_expr(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {expr}"),
        6 | 7 => expr.to_owned(),
        n => {
            return Err(format!(
                "cron {expr:?} has {n} fields: use 5 (`min hour day month weekday`, e.g. \"0 8 * * *\") or 6 with seconds first"
            ));
        }
    };
    cron::Schedule::from_str(&full).map_err(|e| format!("cron {expr:?}: {e}"))
}

impl Schedule {
    /// The next run after now, in ms since the epoch.
    pub fn next_ms(&self) -> Option<i64> {
        self.cron
            .upcoming(self.tz)
            .next()
            .map(|t| t.with_timezone(&Utc).timestamp_millis())
    }

    /// The latest run due after `last_ms` and at or before `now_ms`: the
    /// one to catch up on. `None` if nothing was missed.
    pub fn missed_since(&self, last_ms: i64, now_ms: i64) -> Option<i64> {
        let at = |ms: i64| {
            chrono::DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.with_timezone(&self.tz))
        };
        let first = self
            .cron
            .after(&at(last_ms)?)
            .next()?
            .with_timezone(&Utc)
            .timestamp_millis();
        if first > now_ms {
            return None;
        }
        // Search back from now in widening windows, so a schedule that
        // fires every second does not walk a week of seconds.
        const DAY: i64 = 86_400_000;
        for window in [60_000, 3_600_000, DAY, 32 * DAY, 367 * DAY, i64::MAX] {
            let from = now_ms.saturating_sub(window).max(last_ms);
            let latest = self
                .cron
                .after(&at(from)?)
                .map(|t| t.with_timezone(&Utc).timestamp_millis())
                .take(100_000)
                .take_while(|&t| t <= now_ms)
                .last();
            if latest.is_some() {
                return latest;
            }
        }
        Some(first)
    }
}

/// Fires the schedule until `shutdown`. `last_run_ms` is when it last ran
/// (its tick's `scheduled_at_ms`), if known: with [`CatchUp::Once`] a run
/// missed since then fires at once.
pub async fn run(
    s: Schedule,
    last_run_ms: Option<i64>,
    dispatch: Dispatch,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    if s.catch_up == CatchUp::Once
        && let Some(last) = last_run_ms
        && let Some(missed) = s.missed_since(last, Utc::now().timestamp_millis())
    {
        tracing::info!(plugin = %s.plugin, schedule = %s.name, scheduled_at_ms = missed, "catching up on a run missed while down");
        fire(&s, missed, &dispatch).await;
    }
    loop {
        let Some(at) = s.next_ms() else {
            tracing::info!(plugin = %s.plugin, schedule = %s.name, "schedule has no more runs");
            return;
        };
        let now = Utc::now().timestamp_millis();
        let wait = std::time::Duration::from_millis((at - now).max(0) as u64);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        fire(&s, at, &dispatch).await;
    }
}

async fn fire(s: &Schedule, scheduled_at_ms: i64, dispatch: &Dispatch) {
    let job = Job {
        plugin: s.plugin.clone(),
        event: Event::Schedule(Tick {
            schedule: s.name.clone(),
            scheduled_at_ms,
        }),
        event_id: new_event_id(TYPE),
        slot: None,
    };
    let result = dispatch(job).await;
    tracing::debug!(plugin = %s.plugin, schedule = %s.name, ?result, "schedule run finished");
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_field_expressions_and_zones_parse_with_clear_errors() {
        assert!(parse("0 8 * * *", "Europe/Berlin").is_ok());
        assert!(parse("*/1 * * * * *", "UTC").is_ok());
        assert!(
            parse("0 8 * *", "UTC")
                .unwrap_err()
                .contains("has 4 fields")
        );
        assert!(
            parse("0 8 * * *", "Mars/Olympus")
                .unwrap_err()
                .contains("IANA")
        );
    }

    fn schedule(expr: &str, tz: &str) -> Schedule {
        let (cron, tz) = parse(expr, tz).unwrap();
        Schedule {
            plugin: "p".into(),
            name: "s".into(),
            cron,
            tz,
            catch_up: CatchUp::Once,
        }
    }

    #[test]
    fn the_latest_missed_run_is_found() {
        let daily = schedule("0 8 * * *", "Europe/Berlin");
        let ms = |d, h, m| {
            chrono_tz::Europe::Berlin
                .with_ymd_and_hms(2026, 11, d, h, m, 0)
                .unwrap()
                .timestamp_millis()
        };
        // Ran on the 20th, down until the 23rd 09:00: the 23rd's 08:00 run.
        assert_eq!(
            daily.missed_since(ms(20, 8, 0), ms(23, 9, 0)),
            Some(ms(23, 8, 0))
        );
        // Down from 08:00 to 07:59 the next day: nothing missed.
        assert_eq!(daily.missed_since(ms(20, 8, 0), ms(21, 7, 59)), None);
        // Every second, down for a week: the last second, found quickly.
        let secondly = schedule("* * * * * *", "UTC");
        let now = ms(27, 12, 0) + 500;
        assert_eq!(
            secondly.missed_since(ms(20, 12, 0), now),
            Some(ms(27, 12, 0))
        );
        assert_eq!("once".parse(), Ok(CatchUp::Once));
        assert!(
            "always"
                .parse::<CatchUp>()
                .unwrap_err()
                .contains("\"skip\"")
        );
    }

    #[test]
    fn local_time_holds_across_daylight_saving() {
        let (cron, tz) = parse("0 8 * * *", "Europe/Berlin").unwrap();
        // 2026-03-29 is the spring-forward day in Berlin.
        let start = tz.with_ymd_and_hms(2026, 3, 28, 12, 0, 0).unwrap();
        let runs: Vec<_> = cron.after(&start).take(2).collect();
        assert_eq!(
            runs[0].format("%Y-%m-%d %H:%M %Z").to_string(),
            "2026-03-29 08:00 CEST"
        );
        assert_eq!(
            runs[1].format("%Y-%m-%d %H:%M %Z").to_string(),
            "2026-03-30 08:00 CEST"
        );
        // 24 h minus the lost hour between them in UTC terms is 24 h local.
        let before = cron
            .after(&tz.with_ymd_and_hms(2026, 3, 27, 12, 0, 0).unwrap())
            .next()
            .unwrap();
        assert_eq!(
            (runs[0].with_timezone(&Utc) - before.with_timezone(&Utc)).num_hours(),
            23
        );
    }
}
