//! The kernel's packet events, from its ring buffer to the operator. One ring carries two
//! streams, told apart by the verdict of their reason: drops (audited or not) and accesses,
//! the first packet of each flow from outside that an opening let in. Each event becomes a
//! record that names the container, port and interface ([`drops`], [`access`]), is logged
//! under its own tracing target (per source, the first in a window in full, the rest as one
//! summary: [`summary`]), and is kept (the most recent ones, [`recent`]) for the
//! agent's `/drops` and `/access`, which `guard drops` and `guard access` read ([`client`]).

pub mod access;
pub mod client;
pub mod drops;
pub mod recent;
pub mod ring;
pub mod summary;

use std::{collections::BTreeMap, net::IpAddr};

use guard_common::{
    events::{DROP_PUBLISHED, PacketEvent},
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use crate::host::clock::{Clock, monotonic_ns, utc};

use crate::policy::Proto;

/// What every event says about its packet, named for people: shared by drops and accesses
/// (flattened into their JSON, where its fields come first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seen {
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
}

impl Seen {
    pub fn from_event(e: &PacketEvent, names: &BTreeMap<u32, String>, clock: &Clock) -> Self {
        let bound = e.target != 0;
        Seen {
            time: clock.wall_seconds(e.time_ns),
            src: e.src.into(),
            sport: e.sport,
            dst: e.dst.into(),
            dport: e.dport,
            proto: proto_name(e.proto),
            container: bound
                .then(|| names.get(&e.target).cloned().unwrap_or(format!("target {}", e.target))),
            container_port: (bound && e.container_port != 0).then_some(e.container_port),
            path: bound
                .then(|| if e.flags & DROP_PUBLISHED != 0 { "published" } else { "direct" }.into()),
        }
    }

    /// The packet for people: `tcp A:1 -> B:2 (container db port 5432/tcp, published) on eth0`,
    /// with `port` (` port` or nothing) before the container port.
    fn describe(&self, iface: Option<&str>, port: &str) -> String {
        let to = match (&self.container, self.container_port) {
            (Some(c), Some(p)) => format!(
                " (container {c}{port} {p}/{}, {})",
                self.proto,
                self.path.as_deref().unwrap_or("?")
            ),
            (Some(c), None) => format!(" (container {c})"),
            _ => String::new(),
        };
        let via = iface.map(|i| format!(" on {i}")).unwrap_or_default();
        format!(
            "{} {}:{} -> {}:{}{to}{via}",
            self.proto, self.src, self.sport, self.dst, self.dport
        )
    }
}

/// An IP protocol number as events name it.
fn proto_name(number: u8) -> String {
    match Proto::from_number(number) {
        Some(p) => p.name().to_string(),
        None => match number {
            IPPROTO_ICMP => "icmp".into(),
            IPPROTO_ICMPV6 => "icmpv6".into(),
            n => format!("proto-{n}"),
        },
    }
}

/// The interface an event arrived on, by name.
fn iface(e: &PacketEvent, ifaces: &BTreeMap<u32, String>) -> Option<String> {
    ifaces.get(&e.ifindex).cloned()
}

/// Logs an event at INFO under `$target`: its [`Seen`] as stable key=value fields (JSON keys
/// under `--log-format json`) in a fixed order, then the stream's own fields and the message.
/// Log tools parse these fields: keep their names and order.
macro_rules! log_seen {
    ($target:literal, $seen:expr, $($rest:tt)*) => {{
        let s: &$crate::telemetry::events::Seen = $seen;
        tracing::info!(
            target: $target,
            src = %s.src,
            sport = s.sport,
            dst = %s.dst,
            dport = s.dport,
            proto = %s.proto,
            container = %s.container.as_deref().unwrap_or("-"),
            port = s.container_port.unwrap_or(0),
            path = %s.path.as_deref().unwrap_or("-"),
            $($rest)*
        )
    }};
}
use log_seen;

/// What the agent serves and the client shows of one stream's records.
pub trait Record: Clone + Serialize + DeserializeOwned {
    const KIND: Kind;
    /// When it happened, in seconds since the Unix epoch.
    fn time(&self) -> f64;
    /// One line for people.
    fn line(&self) -> String;
}

/// How a stream of records is named: where the agent serves it, the `guard` subcommand that
/// shows it, and what one and several are called in its messages.
pub struct Kind {
    pub route: &'static str,
    pub command: &'static str,
    pub singular: &'static str,
    pub plural: &'static str,
}

#[cfg(test)]
pub(crate) mod tests {
    use guard_common::{addr::Addr, reason::Reason};

    use super::*;

    /// An event from 10.251.1.2:40000 to 10.251.1.1:15432, bound for target 7's 5432/tcp,
    /// arriving on interface 5.
    pub fn event(reason: Reason, flags: u8) -> PacketEvent {
        let ip = |s: &str| Addr::from(s.parse::<IpAddr>().unwrap());
        PacketEvent {
            src: ip("10.251.1.2"),
            dst: ip("10.251.1.1"),
            time_ns: monotonic_ns(),
            target: 7,
            ifindex: 5,
            sport: 40000,
            dport: 15432,
            container_port: 5432,
            proto: 6,
            reason: reason as u8,
            flags,
            _pad: [0; 7],
        }
    }

    /// A TCP packet to container db's port 5432, published, at time 0.
    pub fn seen(src: &str, sport: u16, dst: &str, dport: u16) -> Seen {
        Seen {
            time: 0.0,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            proto: "tcp".into(),
            container: Some("db".into()),
            container_port: Some(5432),
            path: Some("published".into()),
        }
    }

    /// What `f` logs, as the agent's text format writes it (without colours).
    pub fn logged(f: impl FnOnce()) -> String {
        logged_with(false, f)
    }

    /// What `f` logs, in text or (`json`) as `--log-format json` writes it.
    pub fn logged_with(json: bool, f: impl FnOnce()) -> String {
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
        let logs = tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone());
        if json {
            tracing::subscriber::with_default(logs.json().finish(), f);
        } else {
            tracing::subscriber::with_default(logs.finish(), f);
        }
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }
}
