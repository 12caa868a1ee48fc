//! The flood's test bed and the system changes of its variants, each undone on drop (also on
//! failure and panic). Every name carries `gbench` so [`remove_leftovers`] can clean up after a
//! run that was killed before its drops ran.
//!
//! ```text
//!   netns gbench-out                 host                              netns gbench-ctr
//!   gbo0 10.252.0.2/24  <-veth->  gbh0 10.252.0.1/24   gbc0 10.252.1.1/24  <-veth->  gbc1 10.252.1.2/24
//!                                 10.253.0.0/16 (the "containers") via 10.252.1.2
//! ```
//!
//! The generator in gbench-out sends frames out of gbo0; they arrive in gbh0's XDP hook. The
//! host forwards only what arrives on gbh0 (per-interface forwarding), and whatever is forwarded
//! goes into gbench-ctr, which forwards nothing: no frame leaves the namespaces created here.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

pub const OUT_NS: &str = "gbench-out";
pub const CTR_NS: &str = "gbench-ctr";
pub const HOST_IF: &str = "gbh0";
pub const OUT_IF: &str = "gbo0";
const CTR_HOST_IF: &str = "gbc0";
const CTR_IF: &str = "gbc1";
pub const COMMENT: &str = "gbench";
pub const USER_CHAIN: &str = "GBENCH-USER";
pub const NFT_TABLE: &str = "gbench";

/// Runs a command; fails with its stderr unless it exits 0. Returns stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command whose failure does not matter (cleanup of what may not exist).
fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A change to the system and the command that undoes it.
pub struct Undo {
    what: String,
    program: &'static str,
    args: Vec<String>,
}

impl Undo {
    /// Runs `program do_args`; on drop, runs `program undo_args`.
    pub fn apply(program: &'static str, do_args: &[&str], undo_args: &[&str]) -> Result<Undo> {
        run(program, do_args)?;
        Ok(Undo {
            what: format!("{program} {}", do_args.join(" ")),
            program,
            args: undo_args.iter().map(ToString::to_string).collect(),
        })
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if let Err(e) = run(self.program, &args) {
            eprintln!("bench: cleanup after `{}`: {e:#}", self.what);
        }
    }
}

/// Undoes in reverse order of doing.
#[derive(Default)]
pub struct UndoStack(Vec<Undo>);

impl UndoStack {
    pub fn push(&mut self, undo: Undo) {
        self.0.push(undo);
    }
}

impl Drop for UndoStack {
    fn drop(&mut self) {
        while let Some(undo) = self.0.pop() {
            drop(undo);
        }
    }
}

pub struct Bed {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub out_mac: [u8; 6],
    _undo: UndoStack,
}

impl Bed {
    pub fn create(container_supernet: &str) -> Result<Bed> {
        let mut undo = UndoStack::default();
        undo.push(Undo::apply("ip", &["netns", "add", OUT_NS], &["netns", "del", OUT_NS])?);
        undo.push(Undo::apply("ip", &["netns", "add", CTR_NS], &["netns", "del", CTR_NS])?);
        // Deleting one end of a veth deletes both; the namespaces' ends also die with them.
        undo.push(Undo::apply(
            "ip",
            &["link", "add", HOST_IF, "type", "veth", "peer", "name", OUT_IF, "netns", OUT_NS],
            &["link", "del", HOST_IF],
        )?);
        undo.push(Undo::apply(
            "ip",
            &["link", "add", CTR_HOST_IF, "type", "veth", "peer", "name", CTR_IF, "netns", CTR_NS],
            &["link", "del", CTR_HOST_IF],
        )?);
        // No IPv6 on the test bed: its neighbour discovery would add frames to the counters.
        for dev in [HOST_IF, CTR_HOST_IF] {
            fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1")
                .with_context(|| format!("disabling IPv6 on {dev}"))?;
        }
        for ns in [OUT_NS, CTR_NS] {
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        for args in [
            &["addr", "add", "10.252.0.1/24", "dev", HOST_IF][..],
            &["link", "set", HOST_IF, "up"],
            &["addr", "add", "10.252.1.1/24", "dev", CTR_HOST_IF],
            &["link", "set", CTR_HOST_IF, "up"],
            &["-n", OUT_NS, "link", "set", "lo", "up"],
            &["-n", OUT_NS, "addr", "add", "10.252.0.2/24", "dev", OUT_IF],
            &["-n", OUT_NS, "link", "set", OUT_IF, "up"],
            &["-n", OUT_NS, "route", "add", container_supernet, "via", "10.252.0.1"],
            &["-n", CTR_NS, "link", "set", "lo", "up"],
            &["-n", CTR_NS, "addr", "add", "10.252.1.2/24", "dev", CTR_IF],
            &["-n", CTR_NS, "link", "set", CTR_IF, "up"],
            // The "containers" live behind gbench-ctr; the route goes with gbc0.
            &["route", "add", container_supernet, "via", "10.252.1.2", "dev", CTR_HOST_IF],
        ] {
            run("ip", args)?;
        }
        // Forward what arrives on gbh0 only (IPv4 forwarding is decided by the input device);
        // the setting goes with the interface.
        fs::write(format!("/proc/sys/net/ipv4/conf/{HOST_IF}/forwarding"), "1")
            .context("enabling forwarding on gbh0")?;
        // A veth only accepts redirected frames when its peer runs NAPI: with an XDP program
        // or with GRO. GRO keeps the no-XDP variants free of any XDP program.
        run("ethtool", &["-K", HOST_IF, "gro", "on"])?;
        Ok(Bed {
            host_ifindex: ifindex(HOST_IF)?,
            host_mac: mac(HOST_IF)?,
            out_mac: parse_mac(&run(
                "ip",
                &["netns", "exec", OUT_NS, "cat", &format!("/sys/class/net/{OUT_IF}/address")],
            )?)?,
            _undo: undo,
        })
    }
}

pub fn ifindex(name: &str) -> Result<u32> {
    let s = fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .with_context(|| format!("no interface {name}"))?;
    Ok(s.trim().parse()?)
}

fn mac(name: &str) -> Result<[u8; 6]> {
    parse_mac(&fs::read_to_string(format!("/sys/class/net/{name}/address"))?)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC address {s:?}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC address {s:?}"))
}

/// One counter of an interface (/sys/class/net/IF/statistics/NAME).
pub fn link_stat(iface: &str, name: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{iface}/statistics/{name}");
    Ok(fs::read_to_string(&path).with_context(|| path.clone())?.trim().parse()?)
}

/// The sum of an interface's driver statistics (`ethtool -S`) whose names end with `suffix`.
pub fn ethtool_stat(iface: &str, suffix: &str) -> Result<u64> {
    let out = run("ethtool", &["-S", iface])?;
    let mut sum = 0;
    let mut found = false;
    for line in out.lines() {
        let Some((name, value)) = line.trim().split_once(':') else {
            continue;
        };
        if name.trim().ends_with(suffix) {
            sum += value.trim().parse::<u64>().unwrap_or(0);
            found = true;
        }
    }
    if !found {
        bail!("`ethtool -S {iface}` has no statistic ending in {suffix}");
    }
    Ok(sum)
}

/// Removes whatever a killed run left: rules and chains first, then links and namespaces.
pub fn remove_leftovers() {
    for (table, chain) in [("raw", "PREROUTING"), ("filter", "FORWARD")] {
        let Ok(rules) = run("iptables", &["-t", table, "-S", chain]) else {
            continue;
        };
        for rule in rules.lines().filter(|r| r.contains(COMMENT)) {
            // `-A CHAIN spec...` -> `-D CHAIN spec...`; the comment is a single word.
            let spec: Vec<&str> = rule.split_whitespace().skip(1).collect();
            let mut args = vec!["-t", table, "-D"];
            args.extend(spec);
            eprintln!("bench: removing leftover rule: iptables -t {table} {rule}");
            run_quiet("iptables", &args);
        }
    }
    if run_quiet("iptables", &["-F", USER_CHAIN]) {
        eprintln!("bench: removing leftover chain {USER_CHAIN}");
        run_quiet("iptables", &["-X", USER_CHAIN]);
    }
    if run_quiet("nft", &["delete", "table", "netdev", NFT_TABLE]) {
        eprintln!("bench: removed leftover nft table netdev {NFT_TABLE}");
    }
    for link in [HOST_IF, CTR_HOST_IF] {
        if fs::metadata(format!("/sys/class/net/{link}")).is_ok() {
            eprintln!("bench: removing leftover link {link}");
            run_quiet("ip", &["link", "del", link]);
        }
    }
    for ns in [OUT_NS, CTR_NS] {
        if fs::metadata(format!("/run/netns/{ns}")).is_ok() {
            eprintln!("bench: removing leftover namespace {ns}");
            run_quiet("ip", &["netns", "del", ns]);
        }
    }
}
