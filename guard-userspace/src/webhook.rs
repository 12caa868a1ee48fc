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

use anyhow::{Context as _, bail};
use http_body_util::Full;
use hyper::{Request, Uri, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::warn;

use crate::scan::Change;

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

/// Where changes are sent.
#[derive(Clone, Debug)]
pub struct Target {
    uri: Uri,
    host: String,
    port: u16,
    tls: bool,
}

impl Target {
    /// An `http://` or `https://` URL with a host.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--alert-url {url:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--alert-url {url:?}: only http:// and https:// URLs are supported"),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .with_context(|| format!("--alert-url {url:?} names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Target { uri, host, port, tls })
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
        let tls = if target.tls { Some(tls_connector()?) } else { None };
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
                tracing::error!("alert webhook {uri}: {e:#}; exposure changes go to the log only")
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
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("connecting to {}:{}", target.host, target.port))?;
    let request = Request::post(target.uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, target.uri.authority().map_or("", |a| a.as_str()))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("container-guard/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))?;
    let status = match tls {
        Some(tls) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                .with_context(|| {
                format!("{} is not a name a certificate can carry", target.host)
            })?;
            let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
            exchange(TokioIo::new(stream), request).await?
        }
        None => exchange(TokioIo::new(tcp), request).await?,
    };
    if !status.is_success() {
        bail!("the receiver answered {status}");
    }
    Ok(())
}

async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::StatusCode>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?.status())
}

/// TLS that verifies the receiver's certificate against the system's trust store.
fn tls_connector() -> anyhow::Result<tokio_rustls::TlsConnector> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        bail!(
            "--alert-url is https, but no trusted root certificate was found on this system ({:?})",
            found.errors
        );
    }
    // ring, not aws-lc-rs: no C build beyond cc. Its lack of post-quantum key exchange (why
    // rustls deprecates its default provider) matters little for alerts that say what is
    // already visible from the network.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_or_https_with_a_host() {
        let t = Target::parse("http://127.0.0.1:8099/hook").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("127.0.0.1", 8099, false));
        let t = Target::parse("https://alerts.example/x?y=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("alerts.example", 443, true));
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!(t.host, "::1");
        for bad in ["ftp://x/", "/just/a/path", "http://", "not a url"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_and_never_blocks() {
        // Nothing listens on port 9 of loopback: every change waits in retries.
        let hook = Webhook::start(Target::parse("http://127.0.0.1:9/").unwrap()).unwrap();
        let change = crate::scan::Change {
            direction: "opened".into(),
            kind: crate::scan::Kind::Container,
            name: "web".into(),
            port: 80,
            proto: "tcp".into(),
            reach: crate::scan::Reach::everyone(),
            before: crate::scan::Reach::nobody(),
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
