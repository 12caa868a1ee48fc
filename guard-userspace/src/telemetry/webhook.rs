//! `--alert-url`: each exposure change POSTed as JSON to a webhook, off the agent's path.
//!
//! Changes go into a bounded queue ([`QUEUE`]); one task sends them in order, each with a
//! timeout and retries with backoff ([`BACKOFF`]), so an unreachable receiver delays only the
//! alerts, never the sync or the data path. A change that cannot be queued (the queue is full)
//! or delivered (every attempt failed) is counted and dropped; the log says so at most once a
//! minute. An `https` URL verifies the receiver's certificate against the system's roots.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use crate::{cli::scan::Change, host::http_client};

/// Where changes are sent (`--alert-url`).
pub use crate::host::http_client::Endpoint as Target;

/// Changes waiting to be sent; more are dropped (and counted).
pub const QUEUE: usize = 256;
/// One attempt: connect, TLS, request and response.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The waits between attempts: about 30 s of retrying before a change is given up.
const BACKOFF: [Duration; 6] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// How often a failing webhook is said in the log.
const SAY_EVERY: Duration = Duration::from_secs(60);

/// The webhook's counters, for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    /// Given up after every attempt failed.
    pub failed: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped: AtomicU64,
}

/// Says a failure at most once a minute, counting what it did not say.
#[derive(Debug, Default)]
struct Quiet {
    last: Mutex<Option<Instant>>,
    unsaid: AtomicU64,
}

impl Quiet {
    fn say(&self, message: impl FnOnce(u64) -> String) {
        let mut last = self.last.lock().expect("not poisoned");
        if last.is_some_and(|t| t.elapsed() < SAY_EVERY) {
            self.unsaid.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        warn!("{}", message(self.unsaid.swap(0, Ordering::Relaxed)));
    }
}

/// The sending side: queue a change and return at once.
#[derive(Clone)]
pub struct Webhook {
    queue: mpsc::Sender<Change>,
    pub stats: Arc<Stats>,
    quiet: Arc<Quiet>,
    target: Arc<Target>,
}

impl Webhook {
    /// Starts the sender task for `target` (on the current tokio runtime).
    pub fn start(target: Target) -> anyhow::Result<Self> {
        let tls = target.tls_connector()?;
        let (queue, changes) = mpsc::channel(QUEUE);
        let hook = Webhook {
            queue,
            stats: Arc::default(),
            quiet: Arc::default(),
            target: Arc::new(target),
        };
        tokio::spawn(send_all(changes, hook.clone(), tls));
        Ok(hook)
    }

    /// [`Webhook::start`], or says why not: alerts then go to the log alone, and the agent
    /// protects as ever (a webhook must never keep it from starting).
    pub fn start_or_say(target: Target) -> Option<Self> {
        let uri = target.uri.clone();
        Self::start(target)
            .inspect_err(|e| {
                tracing::error!("alert webhook {uri}: {e:#}; exposure changes go to the log only");
            })
            .ok()
    }

    /// Queues `change`; drops (and counts) it if the queue is full.
    pub fn send(&self, change: Change) {
        if self.queue.try_send(change).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.quiet.say(|unsaid| {
                format!(
                    "alert webhook {}: the queue of {QUEUE} changes is full, a change was dropped ({unsaid} more failures since the last message); protection unchanged",
                    self.target.uri
                )
            });
        }
    }
}

async fn send_all(
    mut changes: mpsc::Receiver<Change>,
    hook: Webhook,
    tls: Option<tokio_rustls::TlsConnector>,
) {
    while let Some(change) = changes.recv().await {
        let body = serde_json::to_vec(&change).unwrap_or_default();
        let mut last_error = String::new();
        let mut delivered = false;
        for wait in std::iter::once(Duration::ZERO).chain(BACKOFF) {
            tokio::time::sleep(wait).await;
            match tokio::time::timeout(TIMEOUT, post(&hook.target, tls.as_ref(), body.clone()))
                .await
            {
                Ok(Ok(())) => {
                    delivered = true;
                    break;
                }
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = format!("no answer within {TIMEOUT:?}"),
            }
        }
        if delivered {
            hook.stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            hook.stats.failed.fetch_add(1, Ordering::Relaxed);
            hook.quiet.say(|unsaid| {
                format!(
                    "alert webhook {}: gave up on a change after {} attempts: {last_error} ({unsaid} more failures since the last message); protection unchanged",
                    hook.target.uri,
                    BACKOFF.len() + 1
                )
            });
        }
    }
}

/// One POST; Ok on a 2xx answer.
async fn post(
    target: &Target,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let request = target
        .request(hyper::Method::POST, target.uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let status = http_client::send(target, tls, request).await?.status();
    if !status.is_success() {
        bail!("the receiver answered {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_and_never_blocks() {
        // Nothing listens on port 9 of loopback: every change waits in retries.
        let hook = Webhook::start(Target::parse("http://127.0.0.1:9/").unwrap()).unwrap();
        let change = crate::cli::scan::Change {
            direction: "opened".into(),
            kind: crate::cli::scan::Kind::Container,
            name: "web".into(),
            port: 80,
            proto: "tcp".into(),
            reach: crate::cli::scan::Reach::everyone(),
            before: crate::cli::scan::Reach::nobody(),
            addresses: vec![],
            rules: vec![],
        };
        for _ in 0..QUEUE + 10 {
            hook.send(change.clone());
        }
        // The sender task has not run yet (nothing was awaited): the overflow is dropped.
        assert_eq!(hook.stats.dropped.load(Ordering::Relaxed), 10);
        assert_eq!(hook.stats.sent.load(Ordering::Relaxed), 0);
    }
}
