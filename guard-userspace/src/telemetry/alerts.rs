//! Alerts on change in `guard run`: the exposure picture ([`crate::cli::scan`]) is kept current,
//! after every sync and every `--scan-interval`, and every change of what outside can reach
//! is one WARN event (JSON under `--log-format json`), a count in /metrics and, with
//! `--alert-url`, one POST to the webhook ([`crate::telemetry::webhook`]).
//!
//! The scan runs in a task of its own and only reads (pins, Docker, sockets): a scan that
//! fails (sock_diag, a program that cannot be test-run, Docker away) is said at most once a
//! minute and keeps the last picture, so a half-read picture never alerts; protection is not
//! touched either way.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    cli::scan::{self, Change, Exposure, Kind},
    kernel::pins::Pins,
    telemetry::metrics::{Exposition, Family},
    telemetry::webhook::Webhook,
};

/// The default `--scan-interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
const SAY_FAILURES_EVERY: Duration = Duration::from_secs(60);

/// The current picture and the counters, shared with the HTTP endpoint.
#[derive(Default)]
pub struct Exposures {
    current: Mutex<Option<Exposure>>,
    /// Poked after every sync: a scan follows.
    synced: Notify,
    opened: AtomicU64,
    closed: AtomicU64,
    scan_errors: AtomicU64,
    webhook: Mutex<Option<Webhook>>,
}

impl Exposures {
    /// The agent synced: scan again (scans coalesce while one runs).
    pub fn after_sync(&self) {
        self.synced.notify_one();
    }

    /// The current picture as JSON, once there is one.
    pub fn json(&self) -> Option<String> {
        let current = self.current.lock().expect("not poisoned");
        current.as_ref().and_then(|e| serde_json::to_string_pretty(e).ok())
    }

    /// The exposure families of /metrics.
    pub fn metrics(&self) -> String {
        let mut page = Exposition::default();
        let current = self.current.lock().expect("not poisoned").clone();
        let mut targets = page.family(&EXPOSED_TARGETS);
        if let Some(e) = &current {
            let (everyone, listed, host) = scan::exposed_targets(e);
            targets
                .sample(&[("scope", "everyone")], everyone)
                .sample(&[("scope", "listed")], listed)
                .sample(&[("scope", "host_service")], host);
        }
        page.family(&EXPOSURE_CHANGES)
            .sample(&[("direction", "opened")], self.opened.load(Ordering::Relaxed))
            .sample(&[("direction", "closed")], self.closed.load(Ordering::Relaxed));
        page.family(&SCAN_ERRORS).sample(&[], self.scan_errors.load(Ordering::Relaxed));
        if let Some(hook) = self.webhook.lock().expect("not poisoned").as_ref() {
            let s = &hook.stats;
            page.family(&WEBHOOK)
                .sample(&[("result", "sent")], s.sent.load(Ordering::Relaxed))
                .sample(&[("result", "failed")], s.failed.load(Ordering::Relaxed))
                .sample(&[("result", "dropped")], s.dropped.load(Ordering::Relaxed));
        }
        page.finish()
    }
}

const EXPOSED_TARGETS: Family = Family::gauge(
    "guard_exposed_targets",
    "Targets outside hosts reach now (container ports and engine doors open to everyone or to listed sources; host services guard does not judge).",
);
const EXPOSURE_CHANGES: Family = Family::counter(
    "guard_exposure_changes_total",
    "Changes of what outside hosts reach, since the agent started.",
);
const SCAN_ERRORS: Family = Family::counter(
    "guard_exposure_scan_errors_total",
    "Exposure scans that failed (the last picture stands).",
);
const WEBHOOK: Family = Family::counter(
    "guard_alert_webhook_total",
    "Changes sent to --alert-url, by result (failed: every attempt failed; dropped: the queue was full).",
);

/// What the scanning task needs from `guard run`'s options.
pub struct ScanOptions {
    pub pins: Pins,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub interval: Duration,
}

/// Keeps `exposures` current and alerts on every change, until the agent stops.
pub async fn keep_current(opts: ScanOptions, exposures: Arc<Exposures>, webhook: Option<Webhook>) {
    *exposures.webhook.lock().expect("not poisoned") = webhook.clone();
    let mut last_said: Option<Instant> = None;
    loop {
        tokio::select! {
            () = exposures.synced.notified() => {}
            () = tokio::time::sleep(opts.interval) => {}
        }
        let now = match scan::scan(&opts.pins, &opts.config, &opts.state_dir).await {
            Ok(now) => now,
            Err(e) => {
                exposures.scan_errors.fetch_add(1, Ordering::Relaxed);
                if last_said.is_none_or(|t| t.elapsed() >= SAY_FAILURES_EVERY) {
                    last_said = Some(Instant::now());
                    warn!(
                        "exposure scan failed: {e:#}; the last picture stands, no alert is sent from a partial one, protection unchanged"
                    );
                }
                continue;
            }
        };
        let before = exposures.current.lock().expect("not poisoned").replace(now.clone());
        let Some(before) = before else {
            let (everyone, listed, host) = scan::exposed_targets(&now);
            info!(
                everyone,
                listed,
                host_services = host,
                "exposure: first picture taken; changes from it are alerted"
            );
            continue;
        };
        for change in scan::changes(&before, &now) {
            alert(&exposures, &change);
            if let Some(hook) = &webhook {
                hook.send(change);
            }
        }
    }
}

/// One WARN event for one change.
fn alert(exposures: &Exposures, c: &Change) {
    let counter = if c.direction == "opened" { &exposures.opened } else { &exposures.closed };
    counter.fetch_add(1, Ordering::Relaxed);
    let kind = match c.kind {
        Kind::Container => "container",
        Kind::HostService => "host_service",
        Kind::EngineDoor => "engine_door",
    };
    warn!(
        event = "exposure_changed",
        direction = %c.direction,
        kind,
        target = %c.name,
        port = c.port,
        proto = %c.proto,
        reach = %c.reach.text(),
        before = %c.before.text(),
        rules = %c.rules.join(", "),
        addresses = %c.addresses.join(" "),
        "exposure {}: {}",
        c.direction,
        c.summary()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::scan::{Reach, Row};

    #[test]
    fn metrics_count_targets_by_scope_and_changes_by_direction() {
        let exposures = Exposures::default();
        assert!(exposures.json().is_none(), "no picture before the first scan");
        let text = exposures.metrics();
        assert!(text.contains("guard_exposure_changes_total{direction=\"opened\"} 0"), "{text}");
        assert!(!text.contains("guard_exposed_targets{"), "no gauge without a picture: {text}");
        let row = |name: &str, kind: Kind, reach: Reach| Row {
            iface: "eth0".into(),
            address: "203.0.113.5".into(),
            port: 80,
            proto: "tcp".into(),
            path: "published".into(),
            kind,
            name: name.into(),
            container_port: Some(80),
            process: None,
            policy: reach.clone(),
            reach,
            why: vec![],
            drift: None,
        };
        let listed = Reach::from_probes(false, vec!["10.0.0.0/8".into()]);
        let picture = Exposure {
            rows: vec![
                row("web", Kind::Container, Reach::everyone()),
                row("db", Kind::Container, listed),
                row("db2", Kind::Container, Reach::nobody()),
                row("sshd", Kind::HostService, Reach::everyone()),
            ],
            ..Default::default()
        };
        *exposures.current.lock().unwrap() = Some(picture);
        let change = scan::changes(
            &Exposure::default(),
            &exposures.current.lock().unwrap().clone().unwrap(),
        );
        for c in &change {
            alert(&exposures, c);
        }
        let text = exposures.metrics();
        for line in [
            "guard_exposed_targets{scope=\"everyone\"} 1",
            "guard_exposed_targets{scope=\"listed\"} 1",
            "guard_exposed_targets{scope=\"host_service\"} 1",
            "guard_exposure_changes_total{direction=\"opened\"} 3",
            "guard_exposure_changes_total{direction=\"closed\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(exposures.json().unwrap().contains("\"sshd\""));
    }
}
