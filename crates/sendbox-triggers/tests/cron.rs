//! The schedule trigger in real time: a run that takes longer than the
//! interval is never overlapped by the next one; the ticks it covered are
//! skipped, not queued up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sendbox_triggers::cron::{self, CatchUp, Schedule};
use sendbox_triggers::{Dispatch, Dispatched, Job};

#[tokio::test]
async fn a_slow_run_is_never_overlapped_by_the_next() {
    let (expr, tz) = cron::parse("* * * * * *", "UTC").unwrap();
    let schedule = Schedule {
        plugin: "p".into(),
        name: "every-second".into(),
        cron: expr,
        tz,
        catch_up: CatchUp::Skip,
    };
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let dispatch: Dispatch = {
        let (running, most, runs) = (running.clone(), most.clone(), runs.clone());
        Arc::new(move |_job: Job| {
            let (running, most, runs) = (running.clone(), most.clone(), runs.clone());
            Box::pin(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                runs.fetch_add(1, Ordering::SeqCst);
                // Each run takes 2.5 ticks.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Dispatched::Committed {
                    queued: vec![],
                    duplicates: vec![],
                    response: None,
                }
            })
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(cron::run(schedule, None, dispatch, async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    assert_eq!(most.load(Ordering::SeqCst), 1, "two runs overlapped");
    let n = runs.load(Ordering::SeqCst);
    // 6.5 s of 2.5 s runs: at most 3 of them, not one per second.
    assert!((1..=3).contains(&n), "{n} runs");
}
