//! The schedule trigger: cron expressions in an IANA time zone.
//!
//! Expressions take 5 fields (`min hour day month weekday`, as in crontab)
//! or 6 with seconds first. Times are computed in the schedule's zone, so
//! `0 8 * * *` in `Europe/Berlin` fires at 08:00 local time on both sides of
//! a daylight-saving change. A schedule's runs never overlap: the next run
//! is computed only after the previous one finished, and runs missed while
//! busy or down are skipped.

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
}

/// Parses an expression and a zone, with a message naming the fix.
pub fn parse(expr: &str, tz: &str) -> Result<(cron::Schedule, Tz), String> {
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
    let schedule = cron::Schedule::from_str(&full).map_err(|e| format!("cron {expr:?}: {e}"))?;
    let tz = Tz::from_str(tz).map_err(|_| {
        format!("timezone {tz:?} is not an IANA zone name like \"UTC\" or \"Europe/Berlin\"")
    })?;
    Ok((schedule, tz))
}

impl Schedule {
    /// The next run after now, in ms since the epoch.
    pub fn next_ms(&self) -> Option<i64> {
        self.cron
            .upcoming(self.tz)
            .next()
            .map(|t| t.with_timezone(&Utc).timestamp_millis())
    }
}

/// Fires the schedule until `shutdown`.
pub async fn run(s: Schedule, dispatch: Dispatch, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
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
        let job = Job {
            plugin: s.plugin.clone(),
            event: Event::Schedule(Tick {
                schedule: s.name.clone(),
                scheduled_at_ms: at,
            }),
            event_id: new_event_id(TYPE),
        };
        let result = dispatch(job).await;
        tracing::debug!(plugin = %s.plugin, schedule = %s.name, ?result, "schedule run finished");
    }
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
