//! `guard`: the container-guard agent and its CLI.

use std::{
    io::IsTerminal,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use guard_userspace::{
    agent::{self, RunOptions},
    cli::bans,
    cli::explain,
    cli::scan,
    cli::status,
    host::crowdsec::CrowdSec,
    host::state_dir as state,
    kernel::pins::{DEFAULT_PIN_DIR, Pins},
    kernel::tc_filter,
    kernel::unload::{self, Unloaded},
    policy::Cidr,
    policy::file::{self as policy_file, Mode},
    telemetry::events::{
        Record,
        access::AccessRecord,
        client::{self, Selection},
        drops::DropRecord,
    },
    telemetry::http,
    telemetry::webhook,
};
use tracing_subscriber::EnvFilter;

/// Stops Docker from exposing container ports to the network: an XDP filter on the host's
/// uplinks drops outside traffic to containers unless a label (or policy) opens the port.
#[derive(Parser)]
#[command(name = "guard", version)]
struct Cli {
    /// Log lines for people (`text`, coloured on a terminal) or for collectors (`json`).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where the agent's pins and policy file are; every command that reads them takes these.
#[derive(clap::Args)]
struct Paths {
    /// The bpffs directory guard pins its programs, links and maps under.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// The policy file (TOML); absent is fine. `guard run` reloads it on change and on SIGHUP.
    #[arg(long, value_name = "FILE", default_value = policy_file::DEFAULT_PATH)]
    config: PathBuf,
}

/// Which of the running agent's recent records `guard drops` and `guard access` show, and how.
#[derive(clap::Args)]
struct Shown {
    /// Then keep showing new ones as they happen.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only those this recent: `90s`, `10m`, `2h`.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    since: Option<Duration>,
    /// Only the last N of those the agent kept (it keeps 1000).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// The running agent's --metrics-addr.
    #[arg(long, value_name = "ADDR:PORT", default_value = http::DEFAULT_ADDR)]
    metrics_addr: String,
}

impl Shown {
    /// Shows the records of `T`'s stream as asked.
    async fn show<T: Record>(self) -> anyhow::Result<()> {
        let selection = Selection { since: self.since, limit: self.limit };
        client::show::<T>(&self.metrics_addr, self.follow, self.json, selection).await
    }
}

/// Where bans are kept: in the kernel (the pins) and on disk (the agent's state directory).
#[derive(clap::Args)]
struct BanPaths {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// The agent's --state-dir: `guard ban`'s bans are kept there.
    #[arg(long, value_name = "DIR", default_value = state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The policy file, for its `deny` entries (listed by `guard bans`).
    #[arg(long, value_name = "FILE", default_value = policy_file::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of `run`'s many flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load the filter, attach it to the uplinks and keep it in sync with Docker (needs root).
    Run {
        /// Protect only this interface (repeatable). Default: every uplink, i.e. every
        /// interface except lo, Docker's bridges, container veths and --trust-iface ones.
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        /// Never filter this interface (repeatable); traffic arriving on it counts as inside.
        #[arg(long = "trust-iface", value_name = "IF")]
        trusted: Vec<String>,
        #[command(flatten)]
        paths: Paths,
        /// Seconds between full reconciles (events trigger one at once anyway).
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        resync_interval: u64,
        /// Override the policy file's mode: `audit` drops nothing and counts would-drops.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Where to serve /metrics, /healthz, /drops and /access (keep it on loopback unless a
        /// firewall guards it).
        #[arg(long, value_name = "ADDR:PORT", default_value = http::DEFAULT_ADDR)]
        metrics_addr: SocketAddr,
        /// Where to keep what the agent last knew (Docker's state, the last policy file that
        /// parsed), so a restart or a reboot starts from it, closed until it has synced.
        #[arg(long, value_name = "DIR", default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// How TC programs go on interfaces: `tcx` links (Linux 6.6 and later) or `netlink`
        /// clsact filters (any kernel). Default: TCX where the kernel has it.
        #[arg(long, value_enum, value_name = "HOW")]
        tc_attach: Option<tc_filter::Mechanism>,
        /// How often to scan what the network can reach (as `guard scan`) besides after every
        /// sync; each change is a WARN event: `90s`, `5m`, `1h`.
        #[arg(long, value_name = "AGE", value_parser = parse_age, default_value = "5m")]
        scan_interval: Duration,
        /// POST each exposure change as JSON to this http:// or https:// URL (https verifies
        /// the certificate against the system's roots).
        #[arg(long, value_name = "URL", value_parser = webhook::Target::parse)]
        alert_url: Option<webhook::Target>,
        /// Follow a CrowdSec local API's decisions (as a bouncer): its bans deny their sources
        /// every container port until they end (`http://127.0.0.1:8080`).
        #[arg(long, value_name = "URL", requires = "crowdsec_key_file")]
        crowdsec_url: Option<String>,
        /// The bouncer's API key (`cscli bouncers add guard -o raw > FILE`).
        #[arg(long, value_name = "FILE")]
        crowdsec_key_file: Option<PathBuf>,
        /// How often to ask the local API for new decisions.
        #[arg(long, value_name = "AGE", value_parser = parse_age, default_value = "10s")]
        crowdsec_poll: Duration,
    },
    /// Show recent drops (and, with --follow, new ones as they happen) from the running agent.
    Drops {
        #[command(flatten)]
        shown: Shown,
    },
    /// Show the access log: who outside got into which container port, and by which rule (the
    /// first packet of each flow an opening let in: a TCP SYN, a new UDP, SCTP or ICMP echo
    /// flow), from the running agent; with --follow, new ones as they happen.
    Access {
        #[command(flatten)]
        shown: Shown,
    },
    /// Show every container port, how it is published and who outside may reach it.
    Status {
        /// The same report as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1, saying why, unless protection is loaded, an agent runs on it and the maps
        /// hold what Docker and the policy file ask for (for monitoring and scripts).
        #[arg(long)]
        check: bool,
        /// The running agent's --state-dir, where it keeps the policy it enforces (used in
        /// place of --config while it runs).
        #[arg(long, value_name = "DIR", default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        paths: Paths,
    },
    /// Why a packet from SRC to DST gets its verdict: runs the loaded program on it.
    ///
    /// Prints the kernel's verdict (`pass` or `drop`) on the first line, then the reason, the
    /// container and the rule that decided.
    Explain {
        /// The source address (an outside host).
        src: IpAddr,
        /// ADDRESS[:PORT[/PROTO]] or CONTAINER[:PORT[/PROTO]] (a running container's name; its
        /// address in the source's family); IPv6 with a port in brackets. Without a port: ICMP.
        #[arg(value_name = "DST[:PORT[/PROTO]]")]
        dst: String,
        /// The interface the packet arrives on (default: the first protected uplink).
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
        /// Print {"verdict", "reason", "container", "rule", ...} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        paths: Paths,
    },
    /// What the network can reach on this host now, judged by the loaded programs.
    ///
    /// Every host socket and container port on every guarded interface, who outside reaches
    /// it and why; the hooks that should run and whether they do. Exits 0 when the kernel lets
    /// in what the policy opens and nothing else, 1 on drift (or a hook missing), 2 on error.
    Scan {
        /// The same picture as JSON.
        #[arg(long)]
        json: bool,
        /// The running agent's --state-dir, where it keeps the policy it enforces.
        #[arg(long, value_name = "DIR", default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        paths: Paths,
    },
    /// Ban a source (address or prefix) from every container port, whatever labels and
    /// rules open; at once, across agent restarts and reboots, until it expires.
    ///
    /// Replies to connections the host or a container started still reach them. A second ban
    /// of the same source renews it. For fail2ban, see deploy/fail2ban.
    Ban {
        #[arg(value_name = "ADDR[/LEN]")]
        source: Cidr,
        /// How long: `90s`, `10m`, `2h`, `7d`. Default: until `guard unban`.
        #[arg(long = "for", value_name = "AGE", value_parser = parse_age)]
        duration: Option<Duration>,
        /// Why, shown by `guard bans` (e.g. "fail2ban sshd").
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
        #[command(flatten)]
        store: BanPaths,
    },
    /// Lift a `guard ban` (not a policy file's `deny`, which the file decides).
    Unban {
        #[arg(value_name = "ADDR[/LEN]")]
        source: Cidr,
        #[command(flatten)]
        store: BanPaths,
    },
    /// List the bans: `guard ban`'s, with their expiry, and the policy file's deny entries.
    Bans {
        /// The same list as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: BanPaths,
    },
    /// Print the version, the commit it was built from and the eBPF map layout.
    Version,
    /// Print a shell completion script (e.g. `guard completions bash >
    /// /usr/share/bash-completion/completions/guard`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from this command line: `guard man | man -l -`.
    Man,
    /// Validate a policy file without touching anything; exits 1 if it does not parse.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove every link, program, map and pin guard created (stop `guard run` first).
    Unload {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Unload even while an agent runs on the pin directory (which leaves its containers
        /// unprotected until it is restarted).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(colour(std::io::stderr().is_terminal())).init(),
        LogFormat::Json => logs.json().init(),
    }
    // `scan` has a third answer besides success and error: drift (1); errors are 2.
    if let Command::Scan { json, state_dir, paths } = &cli.command {
        return match run_scan(*json, state_dir, paths) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("guard: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match cli.log_format {
                LogFormat::Text => eprintln!("guard: error: {e:#}"),
                // One JSON line like every other, so a collector sees why the agent stopped.
                LogFormat::Json => tracing::error!(fatal = true, "{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run_scan(json: bool, state_dir: &std::path::Path, paths: &Paths) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pins = Pins::new(&paths.pin_dir);
    let exposure = runtime.block_on(scan::scan(&pins, &paths.config, state_dir))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&exposure)?);
    } else {
        print!("{}", scan::render(&exposure));
    }
    Ok(exposure.exit_code())
}

/// `90s`, `10m`, `2h`, `1d`, or plain seconds.
fn parse_age(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .trim()
        .split_at(text.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(text.trim().len()));
    let n: u64 =
        number.parse().map_err(|_| format!("{text:?}: expected an age such as 90s, 10m or 2h"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(seconds).map(Duration::from_secs).ok_or_else(|| format!("{text:?} is too long"))
}

/// Colour on a terminal, unless NO_COLOR is set to anything (https://no-color.org).
fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn run(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match command {
        Command::Run {
            ifaces,
            trusted,
            paths,
            resync_interval,
            mode,
            metrics_addr,
            state_dir,
            tc_attach,
            scan_interval,
            alert_url,
            crowdsec_url,
            crowdsec_key_file,
            crowdsec_poll,
        } => runtime.block_on(agent::run(RunOptions {
            ifaces,
            trusted,
            pins: Pins::new(paths.pin_dir),
            resync: Duration::from_secs(resync_interval.max(1)),
            config: paths.config,
            mode,
            metrics_addr,
            state_dir,
            tc: tc_attach,
            scan_interval: scan_interval.max(Duration::from_secs(1)),
            alert_url,
            crowdsec: match (crowdsec_url, crowdsec_key_file) {
                (Some(url), Some(key)) => Some(CrowdSec::from_flags(&url, &key, crowdsec_poll)?),
                _ => None,
            },
        })),
        Command::Drops { shown } => runtime.block_on(shown.show::<DropRecord>()),
        Command::Access { shown } => runtime.block_on(shown.show::<AccessRecord>()),
        Command::Status { json, check, state_dir, paths } => {
            let pins = Pins::new(paths.pin_dir);
            let report = runtime.block_on(status::report(&pins, &paths.config, &state_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            if check {
                status::check(&report).map_err(|why| anyhow::anyhow!("status --check: {why}"))?;
            }
            Ok(())
        }
        Command::Explain { src, dst, iface, json, paths } => {
            let (dst, port) = explain::parse_destination(&dst)?;
            let dst = match dst {
                explain::Destination::Address(ip) => ip,
                explain::Destination::Container(name) => {
                    runtime.block_on(explain::container_address(&name, src))?
                }
            };
            let query = explain::Query { src, dst, port };
            let pins = Pins::new(paths.pin_dir);
            let e = runtime.block_on(explain::explain(
                &pins,
                &paths.config,
                query,
                iface.as_deref(),
            ))?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                print!("{}", explain::render(&e));
            }
            Ok(())
        }
        Command::Scan { .. } => unreachable!("handled in main"),
        Command::Version => {
            let (version, commit, layout) = guard_userspace::telemetry::metrics::build_info();
            println!(
                "guard {version} (commit {commit}, eBPF map layout {layout}, revision {})",
                guard_common::maps::LAYOUT_REVISION
            );
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "guard", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cli = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cli).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let policy = policy_file::parse(&text, &file.display().to_string())?;
            let m = &policy.management;
            let doors = if m.enforce {
                format!("{} cluster and {} admin prefixes", m.cluster.len(), m.admin.len())
            } else {
                "not guarded".into()
            };
            // A deny file that does not parse is an error here (the agent would keep what it
            // last read, and at its start that is nothing); a missing one may come later.
            let mut in_files = 0;
            for path in &policy.deny_files {
                if !path.exists() {
                    eprintln!("warning: deny file {} does not exist (yet)", path.display());
                    continue;
                }
                in_files += bans::read_deny_file(path).map_err(anyhow::Error::msg)?.len();
            }
            println!(
                "{}: ok (mode {}, {} rules, {} trusted sources, {} trusted interfaces, {} denied sources and {in_files} in {} deny files; the engine's doors: {doors})",
                file.display(),
                policy.mode,
                policy.rules.len(),
                policy.trusted_sources.len(),
                policy.trusted_interfaces.len(),
                policy.deny.len(),
                policy.deny_files.len()
            );
            Ok(())
        }
        Command::Ban { source, duration, reason, store } => {
            let pins = Pins::new(&store.pin_dir);
            let until = bans::ban(&pins, &store.state_dir, source, duration, &reason)?;
            match until {
                Some(until) => println!("banned {source} until {}", bans::utc(until)),
                None => println!("banned {source} until `guard unban {source}`"),
            }
            Ok(())
        }
        Command::Unban { source, store } => {
            let pins = Pins::new(&store.pin_dir);
            let policy = policy_file::load(&store.config).unwrap_or_default();
            bans::unban(&pins, &store.state_dir, source, &policy)?;
            println!("unbanned {source}");
            Ok(())
        }
        Command::Bans { json, store } => {
            let list = bans::list(&store.state_dir, &store.config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", bans::render(&list));
            }
            Ok(())
        }
        Command::Unload { pin_dir, force } => {
            let running = if force { unload::Running::Override } else { unload::Running::Refuse };
            match unload::unload_checked(&Pins::new(&pin_dir), running)? {
                Unloaded::NothingThere => {
                    println!("nothing to unload: no pins at {}", pin_dir.display());
                }
                Unloaded::Removed { links, maps } => println!(
                    "unloaded: {links} links detached (XDP and TC), {maps} maps and the programs removed from {}",
                    pin_dir.display()
                ),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_write_them() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("45"), Ok(Duration::from_secs(45)));
        assert!(parse_age("10 weeks").is_err() && parse_age("m").is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_under_no_color() {
        // SAFETY: this test is the only one in this binary that touches the environment.
        unsafe { std::env::remove_var("NO_COLOR") };
        assert!(colour(true) && !colour(false));
        unsafe { std::env::set_var("NO_COLOR", "1") };
        assert!(!colour(true));
        // An empty NO_COLOR does not count (no-color.org).
        unsafe { std::env::set_var("NO_COLOR", "") };
        assert!(colour(true));
    }
}
