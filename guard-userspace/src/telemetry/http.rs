//! The agent's HTTP endpoint (loopback by default): `/metrics` (Prometheus), `/healthz`
//! (liveness: the reconcile loop goes round), `/readyz` (readiness: synced with Docker at
//! least once), `/drops` and `/access` (recent drops, accesses, as JSON lines; `?follow=1`
//! streams new ones), `/exposure` (the current `guard scan` picture as JSON).
//!
//! hyper's HTTP/1 server (already in the tree through bollard), one request per connection,
//! GET only, with limits, because anything that can reach the port may be hostile (see
//! [`Limits`]). It runs on a thread and a runtime of its own: the agent's runtime is
//! single-threaded, and a scrape (map reads are system calls) or a client that misbehaves
//! must never hold up a sync pass. It shares with the reconcile loop only [`Shared`], whose
//! locks both sides hold just long enough to copy or update plain data.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, stream};
use guard_common::events::{STREAM_ACCESS, STREAM_DROPS};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Notify, broadcast::error::RecvError},
};
use tracing::{debug, warn};

use crate::{
    kernel::maps::PolicyMaps,
    kernel::pins::Pins,
    telemetry::events::{Record, access::AccessRecord, drops::DropRecord, recent::Recent},
    telemetry::metrics::{self, AgentState, Exposition, Family, KernelCounters},
};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9184";

/// What the endpoint serves, shared with the reconcile loop.
pub struct Shared {
    pub state: Mutex<AgentState>,
    pub drops: Recent<DropRecord>,
    pub access: Recent<AccessRecord>,
    pub pins: Pins,
    /// When the reconcile loop last went round (liveness).
    pub heartbeat: Mutex<Instant>,
    /// How long without a heartbeat before /healthz fails.
    pub stale_after: Duration,
    /// What outside hosts reach, kept current by [`crate::telemetry::alerts`].
    pub exposures: Arc<crate::telemetry::alerts::Exposures>,
}

/// What one client may cost the agent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From the connection (or the end of the last request) to the end of the request's
    /// headers: a client that sends nothing, or a header a byte at a time, is cut off then.
    pub header_timeout: Duration,
    /// The request line and headers together; more is answered 431 and the connection closed,
    /// so a line that never ends costs at most this much (plus hyper's read buffer, below).
    pub max_head_bytes: usize,
    /// Connections served at once. At the limit a new connection takes the place of the
    /// oldest that has not sent its request yet; when every place is answering or following,
    /// it is closed as soon as it is accepted. Both are counted.
    pub max_connections: usize,
    /// A whole exchange, unless it follows a stream: a client that asks and then does not
    /// read its answer holds a connection this long at most. A follower is held until it
    /// goes away (hyper notices the close while the stream waits for records).
    pub response_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(5),
            max_head_bytes: 8 * 1024,
            max_connections: 64,
            response_deadline: Duration::from_secs(30),
        }
    }
}

/// hyper's read buffer at most (its smallest allowed is 8 KiB): what a request that never
/// ends costs before it is cut off.
const READ_BUFFER: usize = 16 * 1024;

/// Connections: held now, and cut off, by why.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    refused: AtomicU64,
    evicted: AtomicU64,
    header_timeouts: AtomicU64,
    too_large: AtomicU64,
    deadline: AtomicU64,
}

impl Connections {
    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections closed at once because [`Limits::max_connections`] were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Idle connections closed to make room for a new one.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn metrics(&self) -> String {
        let cut = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let mut page = Exposition::default();
        page.family(&HTTP_CONNECTIONS).sample(&[], self.open());
        page.family(&HTTP_REFUSED).sample(&[], self.refused());
        page.family(&HTTP_EVICTED).sample(&[], self.evicted());
        page.family(&HTTP_CUT)
            .sample(&[("limit", "header_timeout")], cut(&self.header_timeouts))
            .sample(&[("limit", "too_large")], cut(&self.too_large))
            .sample(&[("limit", "deadline")], cut(&self.deadline));
        page.finish()
    }
}

const HTTP_CONNECTIONS: Family =
    Family::gauge("guard_http_connections", "Connections to this endpoint open now.");
const HTTP_REFUSED: Family = Family::counter(
    "guard_http_connections_refused_total",
    "Connections closed as soon as accepted: the endpoint held its limit.",
);
const HTTP_EVICTED: Family = Family::counter(
    "guard_http_connections_evicted_total",
    "Idle connections (no request yet) closed to make room for a new one at the limit.",
);
const HTTP_CUT: Family = Family::counter(
    "guard_http_connections_cut_total",
    "Connections closed by a limit: headers too slow, a request too large, an answer not read in time.",
);

/// The endpoint's side of the state: the agent's, its own counters, and the kernel's counter
/// maps, opened once.
struct Endpoint {
    shared: Arc<Shared>,
    limits: Limits,
    connections: Arc<Connections>,
    counters: Mutex<CounterMaps>,
}

/// Binds the endpoint's socket (before anything is loaded, so a port in use stops the start
/// with nothing left behind).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for metrics: {e} (choose another --metrics-addr)")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `listener` on a thread of its own until the process ends; the connection counters.
pub fn start(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
) -> anyhow::Result<Arc<Connections>> {
    let connections = Arc::new(Connections::default());
    let endpoint = Arc::new(Endpoint {
        counters: Mutex::new(CounterMaps::open(&shared.pins)),
        shared,
        limits,
        connections: connections.clone(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("guard-http".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, endpoint).await,
                Err(e) => warn!("http: cannot serve: {e}"),
            }
        });
    })?;
    Ok(connections)
}

/// One connection as the accept loop sees it.
#[derive(Default)]
struct Slot {
    /// Its request's head arrived: it is being answered, no longer idle.
    asked: AtomicBool,
    /// Close it now: it is the oldest idle one and a new client needs its place.
    evict: Notify,
}

async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let limits = endpoint.limits;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_head_bytes)
        .max_buf_size(READ_BUFFER.max(limits.max_head_bytes))
        .max_headers(32)
        // One request per connection, as the HTTP/1.0 server before: nothing idles between
        // requests, and every answer ends with the connection (the record streams' clients
        // read until it closes).
        .keep_alive(false);
    // Connections that have not sent their request yet, oldest first.
    let mut idle: VecDeque<Arc<Slot>> = VecDeque::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: let some go before trying again.
                warn!("http: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connections = endpoint.connections.clone();
        // A slot whose task ended is held by this list alone.
        idle.retain(|slot| !slot.asked.load(Ordering::Relaxed) && Arc::strong_count(slot) > 1);
        if connections.open.load(Ordering::Relaxed) >= limits.max_connections {
            // Idle connections never keep a client out (a client that asks sends its request
            // at once): the oldest makes room. Only when every place is answering or following
            // is the newcomer turned away.
            if let Some(oldest) = idle.pop_front() {
                oldest.evict.notify_one();
                connections.evicted.fetch_add(1, Ordering::Relaxed);
            } else {
                connections.refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
        }
        connections.open.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        idle.push_back(slot.clone());
        let following = Arc::new(AtomicBool::new(false));
        let service = {
            let (endpoint, following, slot) = (endpoint.clone(), following.clone(), slot.clone());
            service_fn(move |request| {
                slot.asked.store(true, Ordering::Relaxed);
                let response = respond(&endpoint, &request, &following);
                async move { Ok::<_, Infallible>(response) }
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let deadline = async {
                tokio::time::sleep(limits.response_deadline).await;
                if following.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            let cut = tokio::select! {
                result = connection => match result {
                    Err(e) if e.is_timeout() => Some(&connections.header_timeouts),
                    Err(e) if e.is_parse_too_large() => Some(&connections.too_large),
                    Err(e) => { debug!(%peer, "http: {e}"); None }
                    Ok(()) => None,
                },
                () = deadline => Some(&connections.deadline),
                () = slot.evict.notified() => None,
            };
            if let Some(counter) = cut {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            connections.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type.parse().expect("a header value"));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    response(status, "text/plain", Full::new(body.into()).boxed())
}

fn respond(
    endpoint: &Endpoint,
    request: &Request<Incoming>,
    following: &AtomicBool,
) -> Response<Body> {
    let shared = &endpoint.shared;
    // Request bodies are never read: with one request per connection, hyper discards them.
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let query = request.uri().query().unwrap_or("");
    match request.uri().path() {
        "/metrics" => {
            let body = Full::new(endpoint.metrics_text().into()).boxed();
            response(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        "/healthz" => {
            let age = shared.heartbeat.lock().expect("not poisoned").elapsed();
            if age <= shared.stale_after {
                text(StatusCode::OK, "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reconcile loop silent for {age:?}\n"),
                )
            }
        }
        // Ready once the maps hold Docker's state (before that, nothing is opened) under the
        // policy file as it is on disk.
        "/readyz" => {
            let (synced, config_valid, restoring, unguarded) = {
                let state = shared.state.lock().expect("not poisoned");
                (state.synced, state.config_valid, state.restoring, state.unguarded.clone())
            };
            let unready = if restoring {
                Some("the pins were removed under the agent; restoring protection\n".to_owned())
            } else if !synced {
                Some("not synced with Docker yet\n".to_owned())
            } else if !config_valid {
                Some("the policy file does not parse; see the log\n".to_owned())
            } else if !unguarded.is_empty() {
                Some(format!("not guarded: {}\n", unguarded.join("\nnot guarded: ")))
            } else {
                None
            };
            match unready {
                None => text(StatusCode::OK, "ready\n"),
                Some(body) => text(StatusCode::SERVICE_UNAVAILABLE, body),
            }
        }
        "/exposure" => match shared.exposures.json() {
            Some(body) => {
                response(StatusCode::OK, "application/json", Full::new(body.into()).boxed())
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no exposure scan yet: one follows the first sync\n",
            ),
        },
        "/drops" => records(&shared.drops, query, following),
        "/access" => records(&shared.access, query, following),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz, /drops, /access or /exposure\n",
        ),
    }
}

/// A stream's recent records as JSON lines, then (`follow=1` in `query`) each new one as it
/// comes, until the client goes (hyper sees the close and drops the body, and with it the
/// subscription).
fn records<T: Record + Send + 'static>(
    store: &Recent<T>,
    query: &str,
    following: &AtomicBool,
) -> Response<Body> {
    let line = |record: &T| serde_json::to_string(record).unwrap_or_default() + "\n";
    // Subscribed before the snapshot is taken: a record pushed in between may show twice,
    // never not at all.
    let follow = query.split('&').any(|kv| kv == "follow=1").then(|| store.follow());
    let backlog: String = store.snapshot().iter().map(line).collect();
    let Some(follow) = follow else {
        return response(StatusCode::OK, "application/x-ndjson", Full::new(backlog.into()).boxed());
    };
    following.store(true, Ordering::Relaxed);
    let new = stream::unfold(follow, move |mut follow| async move {
        loop {
            match follow.recv().await {
                Ok(record) => return Some((line(&record), follow)),
                Err(RecvError::Lagged(n)) => {
                    let route = T::KIND.route;
                    warn!("a {route} follower fell {n} records behind; they are skipped");
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let frames = stream::once(async { backlog })
        .chain(new)
        .map(|text| Ok::<_, Infallible>(Frame::data(Bytes::from(text))));
    response(
        StatusCode::OK,
        "application/x-ndjson",
        http_body_util::BodyExt::boxed(StreamBody::new(frames)),
    )
}

impl Endpoint {
    fn metrics_text(&self) -> String {
        let state = self.shared.state.lock().expect("not poisoned").clone();
        let kernel = self.counters.lock().expect("not poisoned").read(&self.shared.pins);
        metrics::render(&state, kernel.as_ref())
            + &self.shared.exposures.metrics()
            + &self.connections.metrics()
    }
}

/// The kernel's counter maps, opened once and again only when the pins were replaced: the
/// agent restores pins removed under it (`guard unload --force`), and pins the same maps again,
/// so the maps read before stay right meanwhile; a pin file that changed is opened afresh.
struct CounterMaps {
    /// The maps, and the pin files (device, inode) they were opened from.
    open: Option<(PolicyMaps, Vec<(u64, u64)>)>,
}

impl CounterMaps {
    fn open(pins: &Pins) -> Self {
        let mut maps = CounterMaps { open: None };
        maps.reopen_if_replaced(pins);
        maps
    }

    /// The pin files as they are now; None while some are missing (being restored).
    fn files(pins: &Pins) -> Option<Vec<(u64, u64)>> {
        guard_common::maps::ALL
            .iter()
            .map(|name| std::fs::metadata(pins.map(name)).ok().map(|m| (m.dev(), m.ino())))
            .collect()
    }

    fn reopen_if_replaced(&mut self, pins: &Pins) {
        let Some(files) = Self::files(pins) else { return };
        if self.open.as_ref().is_some_and(|(_, opened)| *opened == files) {
            return;
        }
        match PolicyMaps::from_pins(pins) {
            Ok(maps) => self.open = Some((maps, files)),
            Err(e) => debug!("http: cannot open the counter maps: {e}"),
        }
    }

    fn read(&mut self, pins: &Pins) -> Option<KernelCounters> {
        self.reopen_if_replaced(pins);
        let (maps, _) = self.open.as_ref()?;
        Some(KernelCounters {
            packets: maps.counters().ok()?,
            gate: maps.gate_counters().ok()?,
            drops: maps.drops().ok()?,
            drop_events: maps.event_stats(STREAM_DROPS).ok()?,
            access_events: maps.event_stats(STREAM_ACCESS).ok()?,
        })
    }
}
