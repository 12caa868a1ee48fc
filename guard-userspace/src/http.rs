//! The agent's HTTP endpoint (loopback by default): `/metrics` (Prometheus), `/healthz`
//! (liveness: the reconcile loop goes round), `/readyz` (readiness: synced with Docker at
//! least once), `/drops` and `/access` (recent drops, accesses, as JSON lines; `?follow=1`
//! streams new ones), `/exposure` (the current `guard scan` picture as JSON).
//!
//! A deliberately small HTTP/1.0 server on tokio: a few read-only routes do not need a web
//! framework, and every extra dependency is code running as root.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use guard_common::events::{STREAM_ACCESS, STREAM_DROPS};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

use crate::{
    events::{Record, access::AccessRecord, drops::DropRecord, recent::Recent},
    maps::PolicyMaps,
    metrics::{self, AgentState, KernelCounters},
    pins::Pins,
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
    /// What outside hosts reach, kept current by [`crate::alerts`].
    pub exposures: Arc<crate::alerts::Exposures>,
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &shared).await {
                        debug!(%peer, "http: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("http: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for metrics: {e} (choose another --metrics-addr)")
    })
}

async fn handle(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let request = lines.next_line().await?.unwrap_or_default();
    // Headers are not needed: read them off so the client sees a clean close.
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" {
        return respond(&mut write, "405 Method Not Allowed", "text/plain", "GET only\n").await;
    }
    match path {
        "/metrics" => {
            let body = metrics_text(shared);
            respond(&mut write, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => {
            let age = shared.heartbeat.lock().expect("not poisoned").elapsed();
            if age <= shared.stale_after {
                respond(&mut write, "200 OK", "text/plain", "ok\n").await
            } else {
                let body = format!("reconcile loop silent for {age:?}\n");
                respond(&mut write, "503 Service Unavailable", "text/plain", &body).await
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
                None => respond(&mut write, "200 OK", "text/plain", "ready\n").await,
                Some(body) => {
                    respond(&mut write, "503 Service Unavailable", "text/plain", &body).await
                }
            }
        }
        "/exposure" => match shared.exposures.json() {
            Some(body) => respond(&mut write, "200 OK", "application/json", &body).await,
            None => {
                let body = "no exposure scan yet: one follows the first sync\n";
                respond(&mut write, "503 Service Unavailable", "text/plain", body).await
            }
        },
        "/drops" => records(&mut write, &shared.drops, query).await,
        "/access" => records(&mut write, &shared.access, query).await,
        _ => {
            respond(
                &mut write,
                "404 Not Found",
                "text/plain",
                "try /metrics, /healthz, /readyz, /drops, /access or /exposure\n",
            )
            .await
        }
    }
}

/// A stream's recent records as JSON lines, then (`follow=1` in `query`) each new one as it
/// comes, until the client goes.
async fn records<T: Record>(
    write: &mut (impl AsyncWriteExt + Unpin),
    store: &Recent<T>,
    query: &str,
) -> std::io::Result<()> {
    // Subscribed before the snapshot is taken: a record pushed in between may show twice,
    // never not at all.
    let mut follow = query.split('&').any(|kv| kv == "follow=1").then(|| store.follow());
    let mut body = String::new();
    for record in store.snapshot() {
        body += &serde_json::to_string(&record).unwrap_or_default();
        body.push('\n');
    }
    let head = "HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n";
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    if let Some(follow) = follow.as_mut() {
        loop {
            match follow.recv().await {
                Ok(record) => {
                    let line = serde_json::to_string(&record).unwrap_or_default() + "\n";
                    write.write_all(line.as_bytes()).await?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let route = T::KIND.route;
                    warn!("a {route} follower fell {n} records behind; they are skipped");
                }
                Err(_) => break,
            }
        }
    }
    write.shutdown().await
}

fn metrics_text(shared: &Shared) -> String {
    let state = shared.state.lock().expect("not poisoned").clone();
    // Read the kernel's counters from the pins, so a scrape never waits for the reconcile loop.
    let kernel = PolicyMaps::from_pins(&shared.pins).ok().and_then(|maps| {
        Some(KernelCounters {
            packets: maps.counters().ok()?,
            gate: maps.gate_counters().ok()?,
            drops: maps.drops().ok()?,
            drop_events: maps.event_stats(STREAM_DROPS).ok()?,
            access_events: maps.event_stats(STREAM_ACCESS).ok()?,
        })
    });
    metrics::render(&state, kernel.as_ref()) + &shared.exposures.metrics()
}

async fn respond(
    write: &mut (impl AsyncWriteExt + Unpin),
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    write.shutdown().await
}
