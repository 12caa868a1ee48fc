//! Looking at the agent from outside, the way an operator would: the kernel's own view of
//! programs, maps and links (bpftool), the agent's `guard status --json`, its `/metrics`, and
//! its memory use.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::agent::guard_bin;
use crate::cmd::{run, try_run};

/// Parses a tool's JSON output, naming the command on failure.
fn json(what: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("parse `{what}` output: {e}: {text}"))
}

/// `bpftool -j ARGS`.
pub fn bpftool(args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("bpftool", &full);
    // bpftool prints nothing (not `[]`) for an empty list on some versions.
    if out.trim().is_empty() { Value::Array(Vec::new()) } else { json("bpftool", &out) }
}

/// A pinned link as the kernel reports it: its id and the id of the program it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkIds {
    pub link: u64,
    pub prog: u64,
}

/// Every link pinned under `<pin_dir>/links`, by pin name (`xdp-7`, `tc-egress-7`, ...).
pub fn pinned_links(pin_dir: &Path) -> BTreeMap<String, LinkIds> {
    let dir = pin_dir.join("links");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            let info = bpftool(&["link", "show", "pinned", &path.to_string_lossy()]);
            let id = |key: &str| {
                info[key]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no {key} for {}: {info}", path.display()))
            };
            let ids = LinkIds { link: id("id"), prog: id("prog_id") };
            (entry.file_name().to_string_lossy().into_owned(), ids)
        })
        .collect()
}

/// Every map pinned under `<pin_dir>/maps/<layout>/`, by name, with its kernel id.
pub fn pinned_maps(pin_dir: &Path) -> BTreeMap<String, u64> {
    let mut maps = BTreeMap::new();
    let layouts = pin_dir.join("maps");
    for layout in std::fs::read_dir(&layouts).into_iter().flatten().flatten() {
        for map in std::fs::read_dir(layout.path()).into_iter().flatten().flatten() {
            let info = bpftool(&["map", "show", "pinned", &map.path().to_string_lossy()]);
            let id = info["id"].as_u64().unwrap_or_else(|| panic!("no map id: {info}"));
            maps.insert(map.file_name().to_string_lossy().into_owned(), id);
        }
    }
    maps
}

/// The number of entries in a pinned map (`bpftool map dump`).
pub fn map_entry_count(pin_dir: &Path, name: &str) -> usize {
    let layouts = pin_dir.join("maps");
    let layout = std::fs::read_dir(&layouts)
        .unwrap_or_else(|e| panic!("read {}: {e}", layouts.display()))
        .flatten()
        .next()
        .unwrap_or_else(|| panic!("no map layout under {}", layouts.display()));
    let path = layout.path().join(name);
    bpftool(&["map", "dump", "pinned", &path.to_string_lossy()]).as_array().map_or(0, Vec::len)
}

/// The ids of guard's objects in the kernel (programs named `guard_*`, maps named `GUARD_*`,
/// links running a guard program), whoever loaded them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardObjects {
    pub progs: BTreeSet<u64>,
    pub maps: BTreeSet<u64>,
    pub links: BTreeSet<u64>,
}

impl GuardObjects {
    pub fn list() -> Self {
        let ids = |value: &Value, prefix: &str| -> BTreeSet<u64> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| o["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .filter_map(|o| o["id"].as_u64())
                .collect()
        };
        let progs = ids(&bpftool(&["prog", "show"]), "guard_");
        let maps = ids(&bpftool(&["map", "show"]), "GUARD_");
        let links = bpftool(&["link", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
            .filter_map(|l| l["id"].as_u64())
            .collect();
        Self { progs, maps, links }
    }

    /// Every program, map and link in the kernel, whatever its name (to tell whether given
    /// ids are gone).
    pub fn all() -> Self {
        let ids = |value: Value| -> BTreeSet<u64> {
            value.as_array().into_iter().flatten().filter_map(|o| o["id"].as_u64()).collect()
        };
        Self {
            progs: ids(bpftool(&["prog", "show"])),
            maps: ids(bpftool(&["map", "show"])),
            links: ids(bpftool(&["link", "show"])),
        }
    }

    /// What `self` has that `before` did not: the objects one agent created.
    #[must_use]
    pub fn since(&self, before: &GuardObjects) -> GuardObjects {
        self.kind_by_kind(before, |mine, theirs| mine.difference(theirs).copied().collect())
    }

    /// Those of `self`'s ids that are still in `now`.
    #[must_use]
    pub fn still_in(&self, now: &GuardObjects) -> GuardObjects {
        self.kind_by_kind(now, |mine, theirs| mine.intersection(theirs).copied().collect())
    }

    /// `op` on programs, maps and links, each with the same kind in `other`.
    fn kind_by_kind(
        &self,
        other: &GuardObjects,
        op: impl Fn(&BTreeSet<u64>, &BTreeSet<u64>) -> BTreeSet<u64>,
    ) -> GuardObjects {
        GuardObjects {
            progs: op(&self.progs, &other.progs),
            maps: op(&self.maps, &other.maps),
            links: op(&self.links, &other.links),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.maps.is_empty() && self.links.is_empty()
    }
}

/// `guard status --json --pin-dir DIR`, parsed; `Err` with the output if it fails.
pub fn status_json(pin_dir: &Path) -> Result<Value, String> {
    let out = try_run(
        &guard_bin().to_string_lossy(),
        &["status", "--json", "--pin-dir", &pin_dir.to_string_lossy()],
    )?;
    serde_json::from_str(&out).map_err(|e| format!("parse `guard status --json`: {e}: {out}"))
}

/// `protection.pending_changes` of a status report (None: no maps loaded, or null).
pub fn pending_changes(status: &Value) -> Option<u64> {
    status["protection"]["pending_changes"].as_u64()
}

/// The container names of a status report.
pub fn status_containers(status: &Value) -> BTreeSet<String> {
    status["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

/// `guard explain SRC DST --json [--iface IF]` against `pin_dir`: the kernel's verdict
/// ("pass" / "drop") and the reason.
pub fn explain(pin_dir: &Path, src: &str, dst: &str, iface: Option<&str>) -> (String, String) {
    let dir = pin_dir.to_string_lossy();
    let mut args = vec!["explain", src, dst, "--json", "--pin-dir", &dir];
    if let Some(iface) = iface {
        args.extend(["--iface", iface]);
    }
    let out = run(&guard_bin().to_string_lossy(), &args);
    let v = json("guard explain", &out);
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    (field("verdict"), field("reason"))
}

/// A TCP port on 127.0.0.1 nothing listens on right now (for `--metrics-addr`).
pub fn free_local_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// `GET path` over HTTP/1.0 from the agent's loopback endpoint (or any other server): the
/// body, or why it failed (a status other than 200 included).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let (status_line, body) = http_response(addr, path)?;
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET http://{addr}{path}: {status_line}: {}", body.trim()));
    }
    Ok(body)
}

/// `GET path` over HTTP/1.0, whatever the status: (status line, body), or why no HTTP
/// response came.
pub fn http_response(addr: SocketAddr, path: &str) -> Result<(String, String), String> {
    let timeout = Duration::from_secs(5);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status_line = head.lines().next().unwrap_or("");
    if !head.starts_with("HTTP/1.") {
        return Err(format!("GET http://{addr}{path}: {status_line}: {}", body.trim()));
    }
    Ok((status_line.to_owned(), body.to_owned()))
}

/// The value of the metric line whose name and labels are exactly `series` (e.g.
/// `guard_map_update_errors_total{map="GUARD_PORTS"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Resident memory of process `pid`, in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Whether `ifname` (root namespace) has an XDP program or a TCX/clsact attachment, per
/// iproute2: (xdp attached, qdiscs other than the default).
pub fn iface_hooks(ifname: &str) -> (bool, Vec<String>) {
    let links = json("ip -j -d link", &run("ip", &["-j", "-d", "link", "show", "dev", ifname]));
    let xdp = links[0].get("xdp").is_some();
    let qdiscs = json("tc -j qdisc", &run("tc", &["-j", "qdisc", "show", "dev", ifname]));
    let special = qdiscs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["kind"].as_str())
        .filter(|k| matches!(*k, "clsact" | "ingress"))
        .map(str::to_owned)
        .collect();
    (xdp, special)
}

/// A tc filter as `tc -j filter show` reports it: priority, handle, the name it was
/// attached with (bpf filters) and the id of the program it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub pref: u64,
    pub handle: String,
    pub bpf_name: String,
    pub prog: u64,
}

/// The filters on `ifname`'s clsact qdisc on `side` ("ingress" or "egress"); none without it.
pub fn tc_filters(ifname: &str, side: &str) -> Vec<TcFilter> {
    let Ok(out) = try_run("tc", &["-j", "filter", "show", "dev", ifname, side]) else {
        return Vec::new();
    };
    let shown = if out.trim().is_empty() { Value::Array(Vec::new()) } else { json("tc -j", &out) };
    shown
        .as_array()
        .into_iter()
        .flatten()
        // A priority's own entry has no options.
        .filter(|f| f.get("options").is_some())
        .map(|f| TcFilter {
            pref: f["pref"].as_u64().unwrap_or(0),
            handle: f["options"]["handle"].as_str().unwrap_or("").to_owned(),
            bpf_name: f["options"]["bpf_name"].as_str().unwrap_or("").to_owned(),
            prog: f["options"]["prog"]["id"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The filter in guard's slot (priority 1, handle 0x6764) on `ifname`'s `side`.
pub fn guard_filter(ifname: &str, side: &str) -> Option<TcFilter> {
    tc_filters(ifname, side).into_iter().find(|f| f.pref == 1 && f.handle == "0x6764")
}

/// One sample of an exposition: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// The samples of a Prometheus text exposition as the reference parser (the Python client's,
/// `prometheus_client.parser`) reads them: (name, labels, value) each, in order. An
/// exposition it rejects is an error.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    const SCRIPT: &str = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as parse\nfor family in parse(sys.stdin.read()):\n    for s in family.samples:\n        print(json.dumps([s.name, s.labels, s.value]))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "the Prometheus parser rejects it: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("{e}: {line}")))
        .collect()
}

/// Whether the kernel runs the program named `program` at `ifname`'s egress (root namespace),
/// by its own answer: a TCX query (BPF_PROG_QUERY), or guard's clsact filter on kernels
/// without TCX.
pub fn runs_at_egress(ifname: &str, program: &str) -> bool {
    use aya::programs::{SchedClassifier, tc::TcAttachType};
    let tcx = SchedClassifier::query_tcx(ifname, TcAttachType::Egress)
        .map(|(_, programs)| programs.iter().any(|p| p.name_as_str() == Some(program)));
    tcx.unwrap_or(false) || guard_filter(ifname, "egress").is_some_and(|f| f.bpf_name == program)
}
