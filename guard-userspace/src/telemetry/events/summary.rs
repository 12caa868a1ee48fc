//! What of a stream reaches the log: per source, the first event of a window in full, the
//! rest of that window as one summary line. A port scan or a busy web server would otherwise
//! write a line per sampled event (up to 50 per CPU and second) to the journal; the records
//! themselves all still go to `/drops` and `/access`, which keep the detail.
//!
//! Pure: the caller says what time it is, so tests need no sleeps.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{Kind, Record, Seen};

/// How long a source's repeats are gathered into one summary. Ten seconds keeps a scan to
/// two lines per source every ten seconds (its first event, then the summary) while a source
/// that stops is still told within seconds; fail2ban's and Loki's windows are minutes, so
/// they see every scanning source well within them.
pub const WINDOW: Duration = Duration::from_secs(10);

/// How many sources each stream summarises one by one in a window. Beyond them (a flood
/// from spoofed addresses), events are only counted: one line per window says how many.
pub const MAX_SOURCES: usize = 256;

/// How many distinct destination ports a summary counts (a full scan's would cost memory
/// per source for a number nobody needs exactly): beyond it, "1024+".
pub const MAX_DPORTS: usize = 1024;

/// How many distinct sources beyond [`MAX_SOURCES`] are counted; beyond it, "4096+".
pub const MAX_MORE_SOURCES: usize = 4096;

/// A record the summariser can gather: the fields its summary line carries.
pub trait Summarised: Record {
    fn fields(&self) -> Fields<'_>;
    /// Logs the record in full.
    fn log(&self);
    /// Logs a summary of a source's repeats.
    fn log_summary(summary: &Summary);
    /// Logs the events from sources beyond the cap.
    fn log_more(more: &More);
}

/// What a summary gathers of a record.
pub struct Fields<'a> {
    pub seen: &'a Seen,
    pub reason: &'a str,
    /// The stream's own field after its reason: `audited` for drops, `rule` for accesses.
    pub detail: String,
    pub iface: Option<&'a str>,
}

/// What to log.
#[derive(Debug, PartialEq)]
pub enum Line<R> {
    /// The first event from a source in a window: the full line.
    Full(R),
    /// A source's further events in a window that ended.
    Summary(Summary),
    /// Events from sources beyond [`MAX_SOURCES`] in a window that ended.
    More(More),
}

/// One value every repeat had, or that they differed (then the summary leaves the field out).
#[derive(Clone, Debug, PartialEq)]
pub enum Same<T> {
    One(T),
    Varied,
}

impl<T: PartialEq> Same<T> {
    fn see(&mut self, value: T) {
        if matches!(self, Same::One(one) if *one != value) {
            *self = Same::Varied;
        }
    }

    pub fn one(&self) -> Option<&T> {
        match self {
            Same::One(one) => Some(one),
            Same::Varied => None,
        }
    }
}

/// A source's further events in one window (the first was logged in full).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub src: IpAddr,
    pub repeats: u64,
    /// Distinct destination ports, counted up to [`MAX_DPORTS`].
    dports: BTreeSet<u16>,
    pub first_dport: u16,
    pub last_dport: u16,
    pub dst: Same<IpAddr>,
    pub proto: Same<String>,
    pub container: Same<Option<String>>,
    pub container_port: Same<Option<u16>>,
    pub path: Same<Option<String>>,
    /// Every reason, in the order first seen.
    pub reasons: Vec<String>,
    pub detail: Same<String>,
    pub iface: Same<Option<String>>,
}

impl Summary {
    fn new(r: &impl Summarised) -> Self {
        let Fields { seen: s, reason, detail, iface } = r.fields();
        Summary {
            src: s.src,
            repeats: 1,
            dports: BTreeSet::from([s.dport]),
            first_dport: s.dport,
            last_dport: s.dport,
            dst: Same::One(s.dst),
            proto: Same::One(s.proto.clone()),
            container: Same::One(s.container.clone()),
            container_port: Same::One(s.container_port),
            path: Same::One(s.path.clone()),
            reasons: vec![reason.into()],
            detail: Same::One(detail),
            iface: Same::One(iface.map(Into::into)),
        }
    }

    fn add(&mut self, r: &impl Summarised) {
        let Fields { seen: s, reason, detail, iface } = r.fields();
        self.repeats += 1;
        if self.dports.len() < MAX_DPORTS {
            self.dports.insert(s.dport);
        }
        self.last_dport = s.dport;
        self.dst.see(s.dst);
        self.proto.see(s.proto.clone());
        self.container.see(s.container.clone());
        self.container_port.see(s.container_port);
        self.path.see(s.path.clone());
        if !self.reasons.iter().any(|known| known == reason) {
            self.reasons.push(reason.into());
        }
        self.detail.see(detail);
        self.iface.see(iface.map(Into::into));
    }

    /// Distinct destination ports (at most [`MAX_DPORTS`]).
    pub fn dports(&self) -> usize {
        self.dports.len()
    }

    /// The sentence for people: `VERB 57 more from SRC in 10s (destination ports: 12, first
    /// 22, last 8080): TAIL`. Like the full lines', no bare word of it is a field's name.
    pub fn sentence(&self, verb: &str, tail: &str) -> String {
        let plus = if self.dports.len() >= MAX_DPORTS { "+" } else { "" };
        format!(
            "{verb} {} more from {} in {}s (destination ports: {}{plus}, first {}, last {}): {tail}",
            self.repeats,
            self.src,
            WINDOW.as_secs(),
            self.dports.len(),
            self.first_dport,
            self.last_dport
        )
    }
}

/// Events from sources beyond [`MAX_SOURCES`] in one window.
#[derive(Clone, Debug, PartialEq)]
pub struct More {
    /// Distinct sources, counted up to [`MAX_MORE_SOURCES`].
    sources: HashSet<IpAddr>,
    pub repeats: u64,
}

impl More {
    /// Distinct sources (at most [`MAX_MORE_SOURCES`]).
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// The sentence for people: `517 more drops from 300 other sources in 10s, ...`.
    pub fn sentence(&self, kind: &Kind) -> String {
        let plus = if self.sources.len() >= MAX_MORE_SOURCES { "+" } else { "" };
        format!(
            "{} more {} from {}{plus} other sources in {}s, beyond the {MAX_SOURCES} summarised \
             one by one (guard {} lists each)",
            self.repeats,
            kind.plural,
            self.sources.len(),
            WINDOW.as_secs(),
            kind.command
        )
    }
}

/// A source's window: when it began and what came after its first event.
struct Window {
    start: Instant,
    repeats: Option<Summary>,
}

/// One stream's summariser.
pub struct Summariser<R> {
    windows: BTreeMap<IpAddr, Window>,
    more: Option<(Instant, More)>,
    _stream: std::marker::PhantomData<R>,
}

impl<R: Summarised> Summariser<R> {
    pub fn new() -> Self {
        Summariser { windows: BTreeMap::new(), more: None, _stream: std::marker::PhantomData }
    }

    /// An event at `now`: the summaries of windows that ended, then its full line if it is
    /// its source's first in a window.
    pub fn event(&mut self, r: &R, now: Instant) -> Vec<Line<R>> {
        let mut lines = self.flush(now);
        let src = r.fields().seen.src;
        if let Some(window) = self.windows.get_mut(&src) {
            match &mut window.repeats {
                Some(summary) => summary.add(r),
                None => window.repeats = Some(Summary::new(r)),
            }
        } else if self.windows.len() < MAX_SOURCES {
            self.windows.insert(src, Window { start: now, repeats: None });
            lines.push(Line::Full(r.clone()));
        } else {
            let (_, more) = self
                .more
                .get_or_insert_with(|| (now, More { sources: HashSet::new(), repeats: 0 }));
            more.repeats += 1;
            if more.sources.len() < MAX_MORE_SOURCES {
                more.sources.insert(src);
            }
        }
        lines
    }

    /// The summaries of windows that ended by `now` (in source order), and of the sources
    /// beyond the cap; their sources start afresh.
    pub fn flush(&mut self, now: Instant) -> Vec<Line<R>> {
        let ended = |start: Instant| now.saturating_duration_since(start) >= WINDOW;
        let mut lines = Vec::new();
        self.windows.retain(|_, window| {
            if !ended(window.start) {
                return true;
            }
            lines.extend(window.repeats.take().map(Line::Summary));
            false
        });
        if self.more.as_ref().is_some_and(|(start, _)| ended(*start)) {
            lines.extend(self.more.take().map(|(_, more)| Line::More(more)));
        }
        lines
    }
}

impl<R: Summarised> Default for Summariser<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs what a summariser said.
pub fn log<R: Summarised>(lines: Vec<Line<R>>) {
    for line in lines {
        match line {
            Line::Full(r) => r.log(),
            Line::Summary(summary) => R::log_summary(&summary),
            Line::More(more) => R::log_more(&more),
        }
    }
}

/// Logs the events from sources beyond the cap at INFO under `$target`.
macro_rules! log_more {
    ($target:literal, $more:expr, $kind:expr) => {{
        let m: &$crate::telemetry::events::summary::More = $more;
        tracing::info!(
            target: $target,
            more_sources = m.sources(),
            repeats = m.repeats,
            "{}",
            m.sentence(&$kind)
        )
    }};
}
pub(crate) use log_more;

/// Logs a summary at INFO under `$target`: the source first (log tools keyed on it still see
/// it), the full line's fields that every repeat shared (one that varied is left out), the
/// reasons, the stream's own field (`$detail = $value`, from `s.detail`), then how many and which destination ports. Log tools
/// parse these fields (deploy/fail2ban/filter.d/container-guard-drops.conf does): keep the
/// names and their order.
macro_rules! log_summary {
    ($target:literal, $summary:expr, $detail:ident = $value:expr, $sentence:expr) => {{
        let s: &$crate::telemetry::events::summary::Summary = $summary;
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        tracing::info!(
            target: $target,
            src = %s.src,
            dst = s.dst.one().map(tracing::field::display),
            proto = s.proto.one().map(tracing::field::display),
            container = s.container.one().map(|c| tracing::field::display(or_none(c))),
            port = s.container_port.one().map(|p| p.unwrap_or(0)),
            path = s.path.one().map(|p| tracing::field::display(or_none(p))),
            reasons = %s.reasons.join(","),
            $detail = $value,
            iface = s.iface.one().map(|i| tracing::field::display(or_none(i))),
            repeats = s.repeats,
            dports = s.dports(),
            first_dport = s.first_dport,
            last_dport = s.last_dport,
            "{}",
            $sentence
        )
    }};
}
pub(crate) use log_summary;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::events::{
        access::AccessRecord,
        drops::DropRecord,
        tests::{logged, logged_with, seen},
    };

    fn drop(src: &str, dport: u16, reason: &str) -> DropRecord {
        DropRecord {
            seen: seen(src, 40000, "10.0.0.5", dport),
            reason: reason.into(),
            audited: false,
            iface: Some("eth0".into()),
        }
    }

    fn access(src: &str, dport: u16) -> AccessRecord {
        AccessRecord {
            seen: seen(src, 40000, "10.0.0.5", dport),
            reason: "exposed".into(),
            rule: "label guard.expose (5432/tcp)".into(),
            iface: Some("eth0".into()),
        }
    }

    fn at(start: Instant, seconds: f64) -> Instant {
        start + Duration::from_secs_f64(seconds)
    }

    fn summaries<R>(lines: Vec<Line<R>>) -> Vec<Summary> {
        lines
            .into_iter()
            .filter_map(|l| match l {
                Line::Summary(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_event_is_told_in_full_and_repeats_are_counted_until_the_window_ends() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        let first = drop("203.0.113.9", 22, "closed");
        assert_eq!(drops.event(&first, t), vec![Line::Full(first)]);
        for (i, port) in [23, 80, 23, 8080].into_iter().enumerate() {
            let reason = if port == 80 { "rate_limited" } else { "closed" };
            let lines = drops.event(&drop("203.0.113.9", port, reason), at(t, 1.0 + i as f64));
            assert_eq!(lines, vec![], "repeats are not told one by one");
        }
        assert_eq!(drops.flush(at(t, 9.9)), vec![], "the window has not ended");
        let [summary] = &summaries(drops.flush(at(t, 10.0)))[..] else { panic!("one summary") };
        assert_eq!(
            (summary.repeats, summary.dports(), summary.first_dport, summary.last_dport),
            (4, 3, 23, 8080)
        );
        assert_eq!(summary.reasons, ["closed", "rate_limited"]);
        assert_eq!(summary.container.one(), Some(&Some("db".into())));
        assert_eq!(summary.detail.one().map(String::as_str), Some("false"));
        // The next event starts a new window: told in full again.
        let again = drop("203.0.113.9", 22, "closed");
        assert_eq!(drops.event(&again, at(t, 10.5)), vec![Line::Full(again)]);
    }

    #[test]
    fn a_window_without_repeats_ends_without_a_summary() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        drops.event(&drop("203.0.113.9", 22, "closed"), t);
        assert_eq!(drops.flush(at(t, 30.0)), vec![]);
    }

    #[test]
    fn a_quiet_source_is_summarised_by_the_next_flush_or_anyone_s_event() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        drops.event(&drop("203.0.113.9", 22, "closed"), t);
        drops.event(&drop("203.0.113.9", 23, "closed"), at(t, 1.0));
        // Another source's event after the window tells the quiet one's summary first.
        let other = drop("198.51.100.7", 22, "closed");
        let lines = drops.event(&other, at(t, 11.0));
        assert!(
            matches!(&lines[..], [Line::Summary(s), Line::Full(o)]
                if s.src.to_string() == "203.0.113.9" && s.repeats == 1 && *o == other),
            "{lines:?}"
        );
        // A periodic flush tells the other one's, though nothing follows it.
        drops.event(&drop("198.51.100.7", 25, "closed"), at(t, 12.0));
        let [summary] = &summaries(drops.flush(at(t, 21.0)))[..] else { panic!("one summary") };
        assert_eq!((summary.src.to_string().as_str(), summary.last_dport), ("198.51.100.7", 25));
    }

    #[test]
    fn two_sources_have_windows_of_their_own() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        let a = drop("203.0.113.9", 22, "closed");
        let b = drop("198.51.100.7", 22, "closed");
        assert_eq!(drops.event(&a, t), vec![Line::Full(a.clone())]);
        drops.event(&a, at(t, 1.0));
        assert_eq!(drops.event(&b, at(t, 5.0)), vec![Line::Full(b.clone())], "b's first");
        drops.event(&b, at(t, 6.0));
        drops.event(&b, at(t, 7.0));
        let lines = summaries(drops.flush(at(t, 10.0)));
        assert_eq!(lines.len(), 1, "only a's window ended: {lines:?}");
        assert_eq!((lines[0].src, lines[0].repeats), (a.seen.src, 1));
        let lines = summaries(drops.flush(at(t, 15.0)));
        assert_eq!(lines.len(), 1, "then b's: {lines:?}");
        assert_eq!((lines[0].src, lines[0].repeats), (b.seen.src, 2));
    }

    #[test]
    fn access_and_drops_are_summarised_apart() {
        let (mut drops, mut accesses, t) = (Summariser::new(), Summariser::new(), Instant::now());
        let d = drop("203.0.113.9", 22, "closed");
        let a = access("203.0.113.9", 5432);
        assert_eq!(drops.event(&d, t), vec![Line::Full(d.clone())]);
        assert_eq!(accesses.event(&a, t), vec![Line::Full(a.clone())], "a drop is no access");
        accesses.event(&a, at(t, 1.0));
        assert_eq!(summaries(drops.flush(at(t, 10.0))), vec![], "no drop repeated");
        let [summary] = &summaries(accesses.flush(at(t, 10.0)))[..] else { panic!("one") };
        assert_eq!(summary.detail.one().map(String::as_str), Some(a.rule.as_str()));
    }

    #[test]
    fn sources_beyond_the_cap_are_counted_in_one_line_per_window() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        let source = |i: usize| format!("10.9.{}.{}", i / 256, i % 256);
        let mut full = 0;
        for i in 0..MAX_SOURCES + 300 {
            let lines = drops.event(&drop(&source(i), 22, "closed"), at(t, 0.001 * i as f64));
            full += lines.iter().filter(|l| matches!(l, Line::Full(_))).count();
        }
        // One beyond the cap twice: one more event, no more sources.
        drops.event(&drop(&source(MAX_SOURCES), 23, "closed"), at(t, 1.0));
        assert_eq!(full, MAX_SOURCES);
        assert_eq!(drops.windows.len(), MAX_SOURCES, "memory is bounded");
        let lines = drops.flush(at(t, 11.0));
        let more: Vec<_> = lines.iter().filter(|l| matches!(l, Line::More(_))).collect();
        assert!(
            matches!(more[..], [Line::More(m)] if m.sources() == 300 && m.repeats == 301),
            "{more:?}"
        );
        // Slots are free again: a new source is told in full.
        let next = drop("192.0.2.1", 22, "closed");
        assert_eq!(drops.event(&next, at(t, 12.0)), vec![Line::Full(next)]);
    }

    #[test]
    fn varied_fields_are_left_out_and_counts_capped() {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        drops.event(&drop("203.0.113.9", 1, "closed"), t);
        for port in 1..=MAX_DPORTS as u16 + 10 {
            let mut d = drop("203.0.113.9", port, "closed");
            if port == 7 {
                d.seen.container = Some("web".into());
            }
            drops.event(&d, at(t, 1.0));
        }
        let [s] = &summaries(drops.flush(at(t, 10.0)))[..] else { panic!("one summary") };
        assert_eq!((s.dports(), s.container.one()), (MAX_DPORTS, None));
        assert!(s.sentence("dropped", "closed").contains("(destination ports: 1024+, first 1,"));
    }

    /// The summary of three more drops from 203.0.113.9 after a first to 22/tcp.
    fn drop_summary(more: &[(u16, &str)]) -> Summary {
        let (mut drops, t) = (Summariser::new(), Instant::now());
        drops.event(&drop("203.0.113.9", 22, "closed"), t);
        for (port, reason) in more {
            drops.event(&drop("203.0.113.9", *port, reason), at(t, 1.0));
        }
        summaries(drops.flush(at(t, 10.0))).pop().expect("a summary")
    }

    #[test]
    fn summary_lines_carry_the_source_first_and_what_the_repeats_shared() {
        let s = drop_summary(&[(23, "closed"), (80, "rate_limited"), (23, "closed")]);
        let line = logged(|| DropRecord::log_summary(&s));
        assert!(
            line.contains(
                "INFO guard::drops: dropped 3 more from 203.0.113.9 in 10s (destination ports: 2, \
                 first 23, last 23): closed, rate_limited src=203.0.113.9 dst=10.0.0.5 proto=tcp \
                 container=db port=5432 path=published reasons=closed,rate_limited audited=false \
                 iface=eth0 repeats=3 dports=2 first_dport=23 last_dport=23\n"
            ),
            "{line}"
        );
        // No word of the sentence reads as one of the fields to a logfmt parser.
        let (sentence, _) = line.split_once(" src=").unwrap();
        let names = ["src", "dst", "proto", "container", "port", "path", "reasons", "audited"];
        let names = [&names[..], &["iface", "repeats", "dports", "first_dport", "last_dport"]];
        assert!(sentence.split_whitespace().all(|w| !names.concat().contains(&w)), "{line}");
        // Under JSON the same keys, numbers as numbers.
        let json = logged_with(true, || DropRecord::log_summary(&s));
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let fields = &json["fields"];
        assert_eq!(
            (&json["target"], &fields["src"]),
            (&"guard::drops".into(), &"203.0.113.9".into())
        );
        assert_eq!((&fields["repeats"], &fields["port"]), (&3.into(), &5432.into()));
        // A field that varied is left out.
        let mut s = s;
        s.container.see(Some("web".into()));
        let line = logged(|| DropRecord::log_summary(&s));
        assert!(line.contains(" proto=tcp port=5432 path=published "), "{line}");
    }

    #[test]
    fn access_summaries_name_the_rule_and_sources_beyond_the_cap_their_stream() {
        let (mut accesses, t) = (Summariser::new(), Instant::now());
        accesses.event(&access("203.0.113.9", 15432), t);
        accesses.event(&access("203.0.113.9", 15432), at(t, 1.0));
        let [s] = &summaries(accesses.flush(at(t, 10.0)))[..] else { panic!("one summary") };
        let line = logged(|| AccessRecord::log_summary(s));
        assert!(
            line.contains(
                "INFO guard::access: let in 1 more from 203.0.113.9 in 10s (destination ports: 1, \
                 first 15432, last 15432): label guard.expose (5432/tcp) src=203.0.113.9 \
                 dst=10.0.0.5 proto=tcp container=db port=5432 path=published reasons=exposed \
                 rule=\"label guard.expose (5432/tcp)\" iface=eth0 repeats=1 dports=1"
            ),
            "{line}"
        );
        let more = More { sources: HashSet::from(["192.0.2.1".parse().unwrap()]), repeats: 4 };
        let line = logged(|| AccessRecord::log_more(&more));
        assert!(
            line.contains(
                "INFO guard::access: 4 more accesses from 1 other sources in 10s, beyond the 256 \
                 summarised one by one (guard access lists each) more_sources=1 repeats=4"
            ),
            "{line}"
        );
    }
}
