//! `--crowdsec-url`: guard as a CrowdSec bouncer. It follows a local API's decision stream
//! (`GET /v1/decisions/stream`, the bouncer protocol: `startup=true` for every decision in
//! force, then `startup=false` for what changed since the last poll) and publishes the bans it
//! holds, each with its expiry, for the agent to put in the deny set.
//!
//! Fail closed: an LAPI that is down, restarting, slow or answering garbage never lifts a ban.
//! The set stays as it was (bans still end when their own duration runs out) until the LAPI
//! answers again; then the stream starts over with `startup=true`, since a restarted LAPI may
//! have forgotten where this bouncer was in the stream.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{host::http_client, policy::Cidr};

/// How often the stream is polled unless `--crowdsec-poll` says otherwise (the firewall
/// bouncer's default).
pub const DEFAULT_POLL: Duration = Duration::from_secs(10);
/// The shortest poll interval followed.
const MIN_POLL: Duration = Duration::from_millis(100);
/// One poll: connect, request and the whole answer (a `startup=true` answer carrying the
/// community blocklist runs to tens of thousands of decisions).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read; a bigger one is an error (and changes nothing).
const MAX_ANSWER: usize = 64 << 20;
/// The first wait after a failed poll; it doubles up to the poll interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Banned sources, each with its expiry in seconds since the epoch (None: until deleted).
pub type Bans = BTreeMap<Cidr, Option<u64>>;

/// Where the decisions come from.
#[derive(Clone, Debug)]
pub struct CrowdSec {
    /// The LAPI's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// The bouncer's API key (`cscli bouncers add NAME`).
    pub key: String,
    pub poll: Duration,
}

impl CrowdSec {
    /// From `guard run`'s flags: checks the URL and reads the key now, so that a typo or a
    /// missing key file stops the agent at start rather than ban nothing quietly.
    pub fn from_flags(url: &str, key_file: &Path, poll: Duration) -> anyhow::Result<Self> {
        http_client::Endpoint::parse(url).with_context(|| format!("--crowdsec-url {url}"))?;
        let key = read_key_file(key_file).context("--crowdsec-key-file")?;
        Ok(CrowdSec { url: url.to_owned(), key, poll })
    }
}

/// The API key in `path`, whitespace trimmed (`cscli bouncers add NAME -o raw > FILE` leaves a
/// newline).
pub fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the CrowdSec API key from {}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        bail!(
            "{} is empty: put the bouncer's API key in it (`cscli bouncers add NAME -o raw` prints one)",
            path.display()
        );
    }
    Ok(key.to_owned())
}

/// Follows the LAPI's decision stream forever, publishing the bans held after every answer.
pub async fn follow(config: CrowdSec, decisions: watch::Sender<Bans>) {
    let endpoint = match http_client::Endpoint::parse(&config.url) {
        Ok(endpoint) => endpoint,
        Err(e) => return never_follow(&config.url, e).await,
    };
    let tls = match endpoint.tls_connector() {
        Ok(tls) => tls,
        Err(e) => return never_follow(&config.url, e).await,
    };
    let url = config.url.trim_end_matches('/');
    // A zero interval would poll the LAPI in a tight loop.
    let interval = config.poll.max(MIN_POLL);
    let mut held = Held::default();
    let mut startup = true;
    let mut answered = false;
    let mut outage: Option<Instant> = None;
    let mut retry = FIRST_RETRY;
    loop {
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            poll(&endpoint, tls.as_ref(), &config.key, startup),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
        match answer {
            Ok(answer) => {
                held.apply(answer, startup, since_epoch().as_secs_f64());
                let bans = held.bans(now_secs());
                match outage.take() {
                    Some(since) => info!(
                        "CrowdSec LAPI {url} answers again after {:.0?}: {} bans from its decisions",
                        since.elapsed(),
                        bans.len()
                    ),
                    None if startup => info!(
                        "following CrowdSec decisions at {url}: {} bans, polled every {:?}",
                        bans.len(),
                        interval
                    ),
                    None => {}
                }
                publish(&decisions, bans);
                answered = true;
                startup = false;
                retry = FIRST_RETRY;
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                if outage.is_none() {
                    warn!(
                        "CrowdSec LAPI {url}: {e:#}; keeping the {} bans it gave, retrying",
                        held.bans(now_secs()).len()
                    );
                    outage = Some(Instant::now());
                }
                // It may have restarted and lost this bouncer's place in the stream.
                startup = true;
                // Bans still end on their own time while the LAPI is away. Before its first
                // answer the set the agent kept from its last run stands (it ends its bans
                // on time itself): an agent restarted while the LAPI is down lifts nothing.
                if answered {
                    publish(&decisions, held.bans(now_secs()));
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(interval.max(FIRST_RETRY));
            }
        }
    }
}

/// A URL or TLS setup that can never work: said once, and nothing is ever banned from it.
async fn never_follow(url: &str, e: anyhow::Error) {
    error!("--crowdsec-url {url}: {e:#}; no CrowdSec decisions will be followed");
    std::future::pending::<()>().await;
}

fn publish(decisions: &watch::Sender<Bans>, bans: Bans) {
    decisions.send_if_modified(|current| {
        let changed = *current != bans;
        *current = bans;
        changed
    });
}

/// One GET of the stream.
async fn poll(
    endpoint: &http_client::Endpoint,
    tls: Option<&tokio_rustls::TlsConnector>,
    key: &str,
    startup: bool,
) -> anyhow::Result<StreamAnswer> {
    let base = endpoint.uri.path().trim_end_matches('/');
    let path = format!("{base}/v1/decisions/stream?startup={startup}&scopes=ip,range");
    let request = endpoint
        .request(hyper::Method::GET, &path)
        .header("X-Api-Key", key)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))?;
    let response = http_client::send(endpoint, tls, request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        bail!("the LAPI answered {status}: {}", text.trim());
    }
    StreamAnswer::parse(&body)
}

/// A `/v1/decisions/stream` answer. Either list may be `null`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamAnswer {
    #[serde(default)]
    new: Option<Vec<Decision>>,
    #[serde(default)]
    deleted: Option<Vec<Decision>>,
}

impl StreamAnswer {
    pub fn parse(body: &[u8]) -> anyhow::Result<Self> {
        serde_json::from_slice(body).context("the LAPI's answer is not a decision stream")
    }
}

/// One decision, as the LAPI sends it (fields this bouncer does not use are ignored).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Decision {
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    value: Option<String>,
    /// `Ip`, `Range`, or a scope a firewall cannot use (`Country`, `AS`, `Username`...).
    #[serde(default)]
    scope: Option<String>,
    /// `ban`, `captcha`, or another remedy.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    /// What remains, in Go's duration syntax (`3h59m57.6s`; negative once expired).
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    simulated: Option<bool>,
}

impl Decision {
    /// The source this decision bans, if it is a ban guard can enforce.
    fn banned_source(&self) -> Option<Cidr> {
        let is = |field: &Option<String>, what: &str| {
            field.as_deref().is_some_and(|f| f.eq_ignore_ascii_case(what))
        };
        if !is(&self.kind, "ban") || self.simulated == Some(true) {
            return None;
        }
        let value = self.value.as_deref()?.trim();
        let source = if is(&self.scope, "ip") {
            value.parse::<IpAddr>().ok().map(|ip| Cidr::host(ip.to_canonical()))
        } else if is(&self.scope, "range") {
            value.parse::<Cidr>().ok()
        } else {
            return None;
        };
        if source.is_none() {
            warn!(
                "CrowdSec decision {:?}: {value:?} is not an address or prefix; ignored",
                self.id
            );
        }
        source
    }

    /// When the ban ends, from `now` (seconds since the epoch, fractional).
    fn end(&self, now: f64) -> End {
        let Some(text) = self.duration.as_deref() else { return End::Never };
        match parse_go_duration(text) {
            Some(left) if left <= 0.0 => End::Past,
            // Rounded up: a ban never ends before the LAPI's own.
            Some(left) => End::At((now + left).ceil() as u64),
            None => {
                warn!(
                    "CrowdSec decision {:?}: duration {text:?} does not parse; banned until deleted",
                    self.id
                );
                End::Never
            }
        }
    }
}

enum End {
    Never,
    Past,
    At(u64),
}

/// A Go `time.Duration` string (`1h2m3.5s`, `-14.186325ms`, `0s`) in seconds.
pub fn parse_go_duration(text: &str) -> Option<f64> {
    let (sign, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let number_len =
            rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." {
            return None;
        }
        let number: f64 = number.parse().ok()?;
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        seconds += number * scale;
        rest = after;
    }
    Some(sign * seconds)
}

/// The decisions this bouncer holds, by the LAPI's decision id: two decisions on one source
/// (a scenario's and an operator's) are two bans, and deleting one leaves the other.
#[derive(Debug, Default)]
pub struct Held {
    by_decision: BTreeMap<Key, Option<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    id: Option<i64>,
    source: Cidr,
}

impl Held {
    /// Takes in one answer: `startup` answers hold every decision in force and replace what
    /// was held; later ones add and delete. Deletions go first, so a decision in both lists
    /// stays banned.
    pub fn apply(&mut self, answer: StreamAnswer, startup: bool, now: f64) {
        if startup {
            self.by_decision.clear();
        }
        for gone in answer.deleted.unwrap_or_default() {
            match (gone.id, gone.banned_source()) {
                (Some(id), _) => self.by_decision.retain(|key, _| key.id != Some(id)),
                (None, Some(source)) => self.by_decision.retain(|key, _| key.source != source),
                (None, None) => {}
            }
        }
        for decision in answer.new.unwrap_or_default() {
            let Some(source) = decision.banned_source() else { continue };
            let until = match decision.end(now) {
                End::Past => continue,
                End::Never => None,
                End::At(secs) => Some(secs),
            };
            self.by_decision.insert(Key { id: decision.id, source }, until);
        }
        // The LAPI lists expired decisions as deleted, but a missed answer must not keep
        // them here for ever.
        self.by_decision.retain(|_, until| until.is_none_or(|until| until as f64 > now));
    }

    /// The sources banned at `now` (seconds since the epoch), each until its last decision ends.
    pub fn bans(&self, now: u64) -> Bans {
        let mut bans = Bans::new();
        for (key, until) in &self.by_decision {
            if until.is_some_and(|until| until <= now) {
                continue;
            }
            bans.entry(key.source)
                .and_modify(|held: &mut Option<u64>| {
                    *held = match (*held, *until) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    }
                })
                .or_insert(*until);
        }
        bans
    }
}

fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

fn now_secs() -> u64 {
    since_epoch().as_secs()
}

#[cfg(test)]
mod tests;
