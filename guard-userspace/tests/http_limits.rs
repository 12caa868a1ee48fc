//! The agent's HTTP endpoint under hostile clients, served as the agent serves it (its own
//! thread, started from a single-threaded runtime that also runs a stand-in for the reconcile
//! loop), on 127.0.0.1 with no pins: no root needed. The bounds on time are generous: they tell
//! "answered" from "blocked", nothing finer.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use guard_userspace::{
    kernel::pins::Pins,
    telemetry::events::{drops::DropRecord, recent::Recent},
    telemetry::http::{self, Connections, Limits, Shared},
    telemetry::metrics::AgentState,
};

/// Longer than any answer may take while the endpoint is under load.
const PROMPT: Duration = Duration::from_secs(5);

struct Endpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    connections: Arc<Connections>,
}

/// An endpoint with `limits`, started (as the agent does) from inside the current runtime.
fn endpoint(limits: Limits) -> Endpoint {
    let shared = Arc::new(Shared {
        state: Mutex::new(AgentState::default()),
        drops: Recent::new(),
        access: Recent::new(),
        pins: Pins::new("/nonexistent/guard-http-test"),
        heartbeat: Mutex::new(Instant::now()),
        stale_after: Duration::from_secs(3600),
        exposures: Arc::default(),
    });
    let listener = http::bind("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().unwrap();
    let connections = http::start(listener, shared.clone(), limits).expect("start the endpoint");
    Endpoint { addr, shared, connections }
}

/// `raw` sent as is; (status line, headers, body) of the answer, read until the server closes.
fn exchange(addr: SocketAddr, raw: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, PROMPT).expect("connect");
    stream.set_read_timeout(Some(PROMPT)).unwrap();
    stream.write_all(raw.as_bytes()).expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_ascii_lowercase(), body.to_owned())
}

/// GET `path` as `guard drops` and the tests ask (HTTP/1.0, read until close), within
/// [`PROMPT`]: (status line, body).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let started = Instant::now();
    let (status, _, body) = exchange(addr, &format!("GET {path} HTTP/1.0\r\n\r\n"));
    assert!(started.elapsed() < PROMPT, "GET {path} took {:?}", started.elapsed());
    (status, body)
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Runs `clients` (blocking code) beside a stand-in for the agent's reconcile loop on one
/// single-threaded runtime, as in the agent; the endpoint is started on that runtime first.
/// Returns what `clients` returned and the longest the loop waited between two passes.
fn beside_the_loop<T: Send + 'static>(
    limits: Limits,
    clients: impl FnOnce(&Endpoint) -> T + Send + 'static,
) -> (T, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let endpoint = Arc::new(endpoint(limits));
        let shared = endpoint.shared.clone();
        let (done, mut stop) = tokio::sync::oneshot::channel::<()>();
        let passes = tokio::spawn(async move {
            let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
            while stop.try_recv().is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *shared.heartbeat.lock().unwrap() = Instant::now();
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            longest
        });
        let result = tokio::task::spawn_blocking(move || clients(&endpoint)).await.unwrap();
        done.send(()).unwrap();
        (result, passes.await.unwrap())
    })
}

#[test]
fn every_route_answers_as_before() {
    let e = endpoint(Limits::default());
    let (status, headers, body) = exchange(e.addr, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.0 200 OK", "ok\n"));
    assert!(headers.contains("content-type: text/plain\r\n"), "{headers}");
    assert!(headers.contains("content-length: 3"), "{headers}");
    let (status, body) = get(e.addr, "/readyz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.0 503 Service Unavailable", "not synced with Docker yet\n")
    );
    let (status, body) = get(e.addr, "/exposure");
    assert_eq!(status, "HTTP/1.0 503 Service Unavailable");
    assert_eq!(body, "no exposure scan yet: one follows the first sync\n");
    let (status, body) = get(e.addr, "/nowhere");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    assert_eq!(body, "try /metrics, /healthz, /readyz, /drops, /access or /exposure\n");
    let (status, _, body) =
        exchange(e.addr, "POST /metrics HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.0 405 Method Not Allowed", "GET only\n"));
    let (status, headers, body) = exchange(e.addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{headers}");
    assert!(
        body.contains("guard_synced 0\n") && body.contains("guard_http_connections 1\n"),
        "{body}"
    );
    // No pins here: the kernel's families are announced and empty, as before.
    assert!(body.contains("# TYPE guard_packets_total counter\n"), "{body}");
    let (status, headers, body) = exchange(e.addr, "GET /drops HTTP/1.0\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.0 200 OK", ""));
    assert!(headers.contains("content-type: application/x-ndjson"), "{headers}");
    // HTTP/1.1 too (curl, Prometheus): one answer, then the connection closes.
    let (status, headers, body) = exchange(e.addr, "GET /healthz HTTP/1.1\r\nHost: guard\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
    assert!(headers.contains("connection: close"), "{headers}");
}

#[test]
fn a_newline_less_flood_is_cut_off_and_memory_stays_flat() {
    // Whether the loop waits is the next test's question, asked where a stall cannot be
    // mistaken for this test's own 5 s header timeout.
    let ((written, rss_growth, slow_for, metrics), _) = beside_the_loop(Limits::default(), |e| {
        let addr = e.addr;
        let before = rss_kib();
        // Four clients each try to send 64 MiB of one endless request line.
        let floods: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream.set_write_timeout(Some(PROMPT)).unwrap();
                    stream.write_all(b"GET /").unwrap();
                    let chunk = vec![b'a'; 64 * 1024];
                    let mut sent = 0usize;
                    while sent < 64 << 20 {
                        match stream.write(&chunk) {
                            Ok(n) => sent += n,
                            Err(_) => break,
                        }
                    }
                    sent
                })
            })
            .collect();
        let written: Vec<usize> = floods.into_iter().map(|t| t.join().unwrap()).collect();
        let rss_growth = rss_kib().saturating_sub(before);
        // And one that sends its line a byte at a time: the header timeout ends it.
        let started = Instant::now();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut byte = [0u8; 512];
        while started.elapsed() < Duration::from_secs(30) {
            if slow.write_all(b"a").is_err() || matches!(slow.read(&mut byte), Ok(0)) {
                break;
            }
        }
        let slow_for = started.elapsed();
        (written, rss_growth, slow_for, get(addr, "/metrics").1)
    });
    for sent in &written {
        // Cut off after the 8 KiB the head may take; what got out before is the kernel's
        // socket buffers (a few MiB on loopback), not the agent's memory.
        assert!(*sent < 32 << 20, "a client sent {sent} bytes of one line: {written:?}");
    }
    assert!(rss_growth < 32 * 1024, "the process grew by {rss_growth} KiB under the flood");
    assert!(metric(&metrics, "guard_http_connections_cut_total{limit=\"too_large\"}") >= 4);
    assert!(slow_for < Duration::from_secs(20), "a byte-a-time header held on for {slow_for:?}");
    assert_eq!(metric(&metrics, "guard_http_connections_cut_total{limit=\"header_timeout\"}"), 1);
}

#[test]
fn a_hundred_idle_connections_block_neither_answers_nor_the_loop() {
    // Idle connections are held a minute here: a loop they could stall would wait that long,
    // far beyond the bound below, which only a machine stalled for seconds could reach.
    let limits = Limits { header_timeout: Duration::from_secs(60), ..Limits::default() };
    let ((held, evicted, answers), longest_pass) = beside_the_loop(limits, |e| {
        let idle: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(e.addr).unwrap()).collect();
        let mut answers = Vec::new();
        for path in ["/healthz", "/metrics", "/healthz", "/drops"] {
            answers.push(get(e.addr, path).0);
        }
        let held = e.connections.open();
        drop(idle);
        (held, e.connections.evicted(), answers)
    });
    assert!(answers.iter().all(|s| s == "HTTP/1.0 200 OK"), "{answers:?}");
    assert!(held <= Limits::default().max_connections, "{held} connections held");
    // 100 idle, 64 places: the oldest 36 made room for the rest, and one more for the first
    // question (the others found the place it left).
    assert!(evicted >= 37, "only {evicted} idle connections made room");
    assert!(longest_pass < Duration::from_secs(10), "the loop waited {longest_pass:?}");
}

#[test]
fn at_the_limit_newcomers_are_turned_away_and_followers_end_when_they_leave() {
    let limits = Limits { max_connections: 8, ..Limits::default() };
    let e = endpoint(limits);
    // Eight followers take every place; none is idle, so none makes room.
    let mut followers: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(e.addr).unwrap();
            s.set_read_timeout(Some(PROMPT)).unwrap();
            s.write_all(b"GET /drops?follow=1 HTTP/1.0\r\n\r\n").unwrap();
            s
        })
        .collect();
    // Each has its answer's head: it follows (subscribed before the head is written).
    let mut heads = Vec::new();
    for follower in &mut followers {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(follower.read(&mut byte).expect("a follower's head"), 1, "{head:?}");
            head.push(byte[0]);
        }
        heads.push(String::from_utf8(head).unwrap());
    }
    assert!(heads.iter().all(|h| h.starts_with("HTTP/1.0 200 OK\r\n")), "{heads:?}");
    assert_eq!(e.connections.open(), 8);
    let record: DropRecord = serde_json::from_str(
        r#"{"time":1.5,"src":"192.0.2.1","sport":1,"dst":"192.0.2.2","dport":5432,"proto":"tcp","container":"db","container_port":5432,"path":"direct","reason":"closed","audited":false,"iface":"eth0"}"#,
    )
    .unwrap();
    e.shared.drops.push(record);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\"dport\":5432") {
        let n = followers[0].read(&mut buf).expect("a follower reads the new record");
        assert!(n > 0, "the stream ended: {seen}");
        seen += std::str::from_utf8(&buf[..n]).unwrap();
    }

    // A ninth is closed at once, unanswered.
    let mut ninth = TcpStream::connect(e.addr).unwrap();
    ninth.set_read_timeout(Some(PROMPT)).unwrap();
    let _ = ninth.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = ninth.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(e.connections.refused(), 1);

    // Followers that leave free their places, with no record to write to them.
    followers.clear();
    let started = Instant::now();
    while e.connections.open() > 0 {
        assert!(
            started.elapsed() < PROMPT,
            "{} streams outlived their clients",
            e.connections.open()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(e.addr, "/healthz").0, "HTTP/1.0 200 OK");
}
