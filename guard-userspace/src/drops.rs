//! Drop events, from the kernel's ring buffer to the operator: enriched with the container's
//! name, logged, kept (the most recent ones) for `/drops`, and shown by `guard drops`.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::SystemTime,
};

use anyhow::Context as _;
use guard_common::{
    events::{DROP_AUDITED, DROP_PUBLISHED, PacketEvent},
    reason::Reason,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::broadcast,
};

use crate::policy::Proto;

/// How many recent drops `/drops` returns.
const RECENT: usize = 1000;

/// A drop as the operator reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropRecord {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: String,
    pub container: Option<String>,
    pub container_port: Option<u16>,
    /// "published" or "direct" for container-bound packets.
    pub path: Option<String>,
    pub reason: String,
    /// Audit mode waived the drop: the packet passed.
    pub audited: bool,
    pub iface: Option<String>,
}

impl DropRecord {
    pub fn from_event(
        e: &PacketEvent,
        names: &BTreeMap<u32, String>,
        ifaces: &BTreeMap<u32, String>,
        clock: &Clock,
    ) -> Self {
        let proto = match Proto::from_number(e.proto) {
            Some(p) => p.name().to_string(),
            None => match e.proto {
                1 => "icmp".into(),
                58 => "icmpv6".into(),
                n => format!("proto-{n}"),
            },
        };
        let bound = e.target != 0;
        DropRecord {
            time: clock.wall_seconds(e.time_ns),
            src: e.src.into(),
            sport: e.sport,
            dst: e.dst.into(),
            dport: e.dport,
            proto,
            container: bound
                .then(|| names.get(&e.target).cloned().unwrap_or(format!("target {}", e.target))),
            container_port: (bound && e.container_port != 0).then_some(e.container_port),
            path: bound
                .then(|| if e.flags & DROP_PUBLISHED != 0 { "published" } else { "direct" }.into()),
            reason: Reason::from_u32(u32::from(e.reason)).map_or("unknown", Reason::name).into(),
            audited: e.flags & DROP_AUDITED != 0,
            iface: ifaces.get(&e.ifindex).cloned(),
        }
    }

    /// One line for people: what was dropped, bound for what, and why.
    pub fn line(&self) -> String {
        let verb = if self.audited { "would drop (audit)" } else { "dropped" };
        let to = match (&self.container, self.container_port) {
            (Some(c), Some(p)) => format!(
                " (container {c} port {p}/{}, {})",
                self.proto,
                self.path.as_deref().unwrap_or("?")
            ),
            (Some(c), None) => format!(" (container {c})"),
            _ => String::new(),
        };
        let via = self.iface.as_deref().map(|i| format!(" on {i}")).unwrap_or_default();
        format!(
            "{verb} {} {}:{} -> {}:{}{to}{via}: {}",
            self.proto, self.src, self.sport, self.dst, self.dport, self.reason
        )
    }
}

/// Logs a drop: the sentence for people, then the same as stable key=value fields (JSON keys
/// under `--log-format json`) for log tools. deploy/fail2ban/filter.d/container-guard-drops.conf
/// parses them: keep the names and their order.
pub fn log(r: &DropRecord) {
    tracing::info!(
        target: "guard::drops",
        src = %r.src,
        sport = r.sport,
        dst = %r.dst,
        dport = r.dport,
        proto = %r.proto,
        container = %r.container.as_deref().unwrap_or("-"),
        port = r.container_port.unwrap_or(0),
        path = %r.path.as_deref().unwrap_or("-"),
        reason = %r.reason,
        audited = r.audited,
        iface = %r.iface.as_deref().unwrap_or("-"),
        "{}",
        r.line()
    );
}

/// Turns CLOCK_MONOTONIC stamps into wall-clock time.
pub struct Clock {
    wall_at_start: SystemTime,
    mono_at_start_ns: u64,
}

impl Clock {
    pub fn new() -> Self {
        Clock { wall_at_start: SystemTime::now(), mono_at_start_ns: monotonic_ns() }
    }

    fn wall_seconds(&self, mono_ns: u64) -> f64 {
        let offset = mono_ns as i128 - self.mono_at_start_ns as i128;
        let start = self.wall_at_start.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        start.as_secs_f64() + offset as f64 / 1e9
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The most recent drops, and a channel to follow new ones.
pub struct RecentDrops {
    recent: Mutex<VecDeque<DropRecord>>,
    new: broadcast::Sender<DropRecord>,
}

impl RecentDrops {
    pub fn new() -> Self {
        RecentDrops {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            new: broadcast::channel(RECENT).0,
        }
    }

    pub fn push(&self, record: DropRecord) {
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record.clone());
        let _ = self.new.send(record);
    }

    pub fn snapshot(&self) -> Vec<DropRecord> {
        self.recent.lock().expect("not poisoned").iter().cloned().collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<DropRecord> {
        self.new.subscribe()
    }
}

impl Default for RecentDrops {
    fn default() -> Self {
        Self::new()
    }
}

/// `guard drops`: prints the agent's recent drops (and, with `follow`, new ones as they come).
/// What `guard drops` shows of the agent's recent drops.
#[derive(Clone, Copy, Debug, Default)]
pub struct Selection {
    /// Only drops this recent.
    pub since: Option<std::time::Duration>,
    /// Only the last this many (of the recent ones; new ones under --follow all show).
    pub limit: Option<usize>,
}

pub async fn show(
    metrics_addr: &str,
    follow: bool,
    json: bool,
    selection: Selection,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(metrics_addr).await.with_context(|| {
        format!(
            "cannot reach the agent at {metrics_addr}: is `guard run` running (see --metrics-addr)?"
        )
    })?;
    let path = if follow { "/drops?follow=1" } else { "/drops" };
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    // Skip the status line and headers.
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
    }
    let oldest = selection.since.map(|since| wall_seconds_now() - since.as_secs_f64());
    let print = |record: &DropRecord| {
        if json {
            println!("{}", serde_json::to_string(record).unwrap_or_default());
        } else {
            println!("{} {}", utc(record.time), record.line());
        }
    };
    // The agent sends what it kept first, then (following) each new drop as it happens: a
    // pause in the lines ends the backlog, which the selection's limit applies to.
    let mut backlog = Vec::new();
    let (mut shown, mut live) = (0, false);
    loop {
        let next = if follow && !live {
            let pause = std::time::Duration::from_millis(200);
            match tokio::time::timeout(pause, lines.next_line()).await {
                Ok(line) => line?,
                Err(_) => {
                    shown += flush(&mut backlog, selection.limit, &print);
                    live = true;
                    continue;
                }
            }
        } else {
            lines.next_line().await?
        };
        let Some(line) = next else { break };
        let record: DropRecord =
            serde_json::from_str(&line).context("a drop record from the agent")?;
        if oldest.is_some_and(|oldest| record.time < oldest) {
            continue;
        }
        if live {
            print(&record);
            shown += 1;
        } else {
            backlog.push(record);
        }
    }
    shown += flush(&mut backlog, selection.limit, &print);
    if follow {
        eprintln!("guard drops: the agent closed the stream (it stopped or restarted)");
    } else if shown == 0 {
        eprintln!(
            "guard drops: no drops{} among the last {RECENT} the agent keeps",
            selection.since.map(|s| format!(" in the last {s:?}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Prints the last `limit` (or all) of `records` and empties it; returns how many it printed.
fn flush(
    records: &mut Vec<DropRecord>,
    limit: Option<usize>,
    print: &impl Fn(&DropRecord),
) -> usize {
    let skip = limit.map_or(0, |limit| records.len().saturating_sub(limit));
    let shown = records.len() - skip;
    records.drain(..).skip(skip).for_each(|r| print(&r));
    shown
}

fn wall_seconds_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch as UTC, ISO 8601 to the millisecond (`2026-12-07T02:41:09.123Z`).
pub fn utc(seconds: f64) -> String {
    let millis = (seconds * 1000.0).round() as i64;
    let (days, ms_of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, ms) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use guard_common::addr::Addr;

    use super::*;

    #[test]
    fn drop_lines_carry_stable_key_value_fields_for_log_tools() {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).finish();
        let record = DropRecord {
            time: 0.0,
            src: "203.0.113.9".parse().unwrap(),
            sport: 40000,
            dst: "10.0.0.5".parse().unwrap(),
            dport: 5432,
            proto: "tcp".into(),
            container: Some("db".into()),
            container_port: Some(5432),
            path: Some("published".into()),
            reason: "closed".into(),
            audited: false,
            iface: Some("eth0".into()),
        };
        tracing::subscriber::with_default(subscriber, || log(&record));
        let line = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        // What the fail2ban filter's failregex expects, in this order.
        let fields = "src=203.0.113.9 sport=40000 dst=10.0.0.5 dport=5432 proto=tcp \
                      container=db port=5432 path=published reason=closed audited=false iface=eth0";
        assert!(line.contains("INFO guard::drops: dropped tcp 203.0.113.9:40000"), "{line}");
        assert!(line.trim_end().ends_with(fields), "{line}");
    }

    #[test]
    fn records_name_the_container_and_port() {
        let ip = |s: &str| Addr::from(s.parse::<IpAddr>().unwrap());
        let event = PacketEvent {
            src: ip("10.251.1.2"),
            dst: ip("10.251.1.1"),
            time_ns: monotonic_ns(),
            target: 7,
            ifindex: 5,
            sport: 40000,
            dport: 15432,
            container_port: 5432,
            proto: 6,
            reason: Reason::Closed as u8,
            flags: DROP_PUBLISHED,
            _pad: [0; 7],
        };
        let names = BTreeMap::from([(7, "db".to_string())]);
        let ifaces = BTreeMap::from([(5, "eth0".to_string())]);
        let record = DropRecord::from_event(&event, &names, &ifaces, &Clock::new());
        assert_eq!(
            record.line(),
            "dropped tcp 10.251.1.2:40000 -> 10.251.1.1:15432 (container db port 5432/tcp, published) on eth0: closed"
        );
        let json = serde_json::to_string(&record).unwrap();
        let back: DropRecord = serde_json::from_str(&json).unwrap();
        // Floats survive JSON to within an ulp or so, not to the bit.
        assert!((back.time - record.time).abs() < 1e-3);
        assert_eq!(DropRecord { time: record.time, ..back }, record);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((record.time - now).abs() < 5.0, "wall clock conversion");
        let audited = PacketEvent { flags: DROP_AUDITED, target: 0, ..event };
        let line = DropRecord::from_event(&audited, &names, &ifaces, &Clock::new()).line();
        assert!(line.starts_with("would drop (audit) tcp"), "{line}");
    }

    #[test]
    fn recent_drops_are_bounded_and_followable() {
        let recent = RecentDrops::new();
        let mut follower = recent.follow();
        let record = |i: u16| DropRecord { sport: i, ..plain_record(0.0) };
        for i in 0..(RECENT as u16 + 10) {
            recent.push(record(i));
        }
        let kept = recent.snapshot();
        assert_eq!(kept.len(), RECENT);
        assert_eq!(kept[0].sport, 10, "the oldest are forgotten first");
        let mut late = recent.follow();
        recent.push(record(7));
        recent.push(record(8));
        assert_eq!((late.try_recv().unwrap().sport, late.try_recv().unwrap().sport), (7, 8));
        assert!(follower.try_recv().is_ok(), "an early follower sees records too");
    }

    /// A drop of nothing in particular, at `time`.
    fn plain_record(time: f64) -> DropRecord {
        DropRecord {
            time,
            src: "10.0.0.1".parse().unwrap(),
            sport: 1,
            dst: "10.0.0.2".parse().unwrap(),
            dport: 80,
            proto: "tcp".into(),
            container: None,
            container_port: None,
            path: None,
            reason: "closed".into(),
            audited: false,
            iface: None,
        }
    }

    #[test]
    fn utc_stamps_are_iso_8601() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400.5), "2000-02-29T00:00:00.500Z");
        assert_eq!(utc(1_796_611_269.123), "2026-12-07T02:41:09.123Z");
    }

    #[test]
    fn a_limit_keeps_the_last_records() {
        let mut records: Vec<DropRecord> = (0..5).map(|t| plain_record(f64::from(t))).collect();
        let printed = std::cell::RefCell::new(Vec::new());
        let shown =
            flush(&mut records, Some(2), &|r: &DropRecord| printed.borrow_mut().push(r.time));
        assert_eq!((shown, printed.into_inner()), (2, vec![3.0, 4.0]));
        assert!(records.is_empty());
    }
}
