//! A real multi-node Docker Swarm: Docker Engine 28 daemons, each in a network namespace of
//! its own (a "node"), on one LAN with outside hosts.
//!
//! The LAN is a bridge inside a namespace of its own (`guard-e2e-lan`); every host on it is a
//! namespace whose `eth0` is a veth into that bridge: nodes n1, n2 (and n3 on demand) at
//! 10.77.0.11, .12, .13, an outside host at .66 and a second one at .67 that tests may name as
//! an admin host. Nothing here touches the root namespace's network: the nodes' docker0,
//! docker_gwbridge, overlays and iptables are their own, so the swarm runs beside the
//! machine's dockerd 20.10, which only lends the test image.
//!
//! Each node's dockerd is the unpacked Docker 28 that xtask names in `GUARD_TEST_DOCKER28_ROOT`,
//! started with `nsenter --net` (`ip netns exec` remounts /sys and dockerd then fails), with its
//! data, runtime files, socket and own containerd under `/var/tmp/ge2e-swarm/NODE` and an empty
//! configuration file (whatever /etc/docker/daemon.json says is the machine's daemon's).
//! Everything is an RAII guard; a run killed outright leaves that directory, which
//! [`remove_leftovers`] undoes (processes, mounts, files) before the next test.

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::Place;
use crate::cmd::{self, run, try_run};
use crate::docker::{docker_bin, image};
use crate::netns::{NETNS_PREFIX, Netns};
use crate::probe::EchoServer;
use crate::raw::{self, ETH_P_IP, IPPROTO_UDP};

/// Where xtask unpacked Docker 28 (`ROOT/usr/sbin/dockerd`, `ROOT/usr/bin/docker`).
pub const DOCKER28_ROOT_VAR: &str = "GUARD_TEST_DOCKER28_ROOT";
/// Every node's daemon lives below this (short: unix socket paths must stay under 108 bytes).
pub const SCRATCH: &str = "/var/tmp/ge2e-swarm";
/// The LAN every host is on.
pub const LAN_PREFIX: u8 = 24;
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 66);
pub const ADMIN: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 67);
/// The attachable overlay every swarm gets, with a fixed subnet so that tests can name
/// addresses.
pub const OVERLAY: &str = "guard-e2e-ov";
pub const OVERLAY_SUBNET: &str = "10.78.0.0/24";
/// Swarm's data-path (VXLAN) port, which `swarm init` leaves at its default.
pub const VXLAN_PORT: u16 = 4789;
/// The plain-text API port a node offers with [`SwarmOptions::api_on_tcp`].
pub const API_PORT: u16 = 2375;
/// Where a test may bind the agent's metrics inside a node's namespace (its own loopback).
pub const METRICS_ADDR: &str = "127.0.0.1:9184";

/// A daemon answers its socket within about 2 s here; swarm membership settles in seconds.
fn start_timeout() -> Duration {
    crate::patience(Duration::from_secs(60))
}

fn stop_timeout() -> Duration {
    crate::patience(Duration::from_secs(60))
}

/// The unpacked Docker 28 (`$GUARD_TEST_DOCKER28_ROOT`); panics saying how to get one.
pub fn docker28_root() -> PathBuf {
    let root = std::env::var_os(DOCKER28_ROOT_VAR).map_or_else(
        || {
            panic!(
                "{DOCKER28_ROOT_VAR} is not set: the swarm tests run Docker 28 daemons that \
             `cargo xtask test` unpacks and names there (run them with `cargo xtask test \
             --engine docker28`)"
            )
        },
        PathBuf::from,
    );
    let dockerd = root.join("usr/sbin/dockerd");
    assert!(dockerd.is_file(), "{DOCKER28_ROOT_VAR}={}: no {}", root.display(), dockerd.display());
    root
}

/// The Docker 28 CLI, matched to the nodes' daemons.
fn docker28_cli() -> PathBuf {
    docker28_root().join("usr/bin/docker")
}

// ---------------------------------------------------------------------------------------
// The LAN and its hosts
// ---------------------------------------------------------------------------------------

/// A host on the LAN: a namespace whose `eth0` is plugged into the LAN's bridge.
pub struct LanHost {
    netns: Netns,
    addr: Ipv4Addr,
}

impl LanHost {
    fn new(lan: &Netns, name: &str, addr: Ipv4Addr) -> Self {
        let netns = Netns::new(&format!("{NETNS_PREFIX}{name}"));
        let port = format!("p-{name}");
        // Both ends are made in the LAN's namespace and one moved out: the root namespace
        // never holds either.
        lan.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        lan.ip(&["link", "set", &port, "master", "br0", "up"]);
        netns.ip(&["addr", "add", &format!("{addr}/{LAN_PREFIX}"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        Self { netns, addr }
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Runs `f` inside this host (see [`crate::netns::in_netns`]).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.netns.run(f)
    }
}

// ---------------------------------------------------------------------------------------
// A node's daemon
// ---------------------------------------------------------------------------------------

/// A dockerd 28 inside a node's namespace, with everything it keeps under `SCRATCH/NODE`.
/// Drop stops it (its containers with it), unmounts what it left mounted and removes the
/// directory.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl Daemon {
    fn start(host: &LanHost, name: &str, api_on_tcp: bool) -> Self {
        let root = docker28_root();
        let dir = Path::new(SCRATCH).join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        fs::write(dir.join("daemon.json"), "{}\n").unwrap();
        let log = File::create(dir.join("dockerd.log")).unwrap();
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", host.netns().path().display()))
            .arg(root.join("usr/sbin/dockerd"))
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("d.sock").display()))
            .arg("--userland-proxy-path")
            .arg(root.join("usr/sbin/docker-proxy"))
            // Its containers (busybox as PID 1 ignores SIGTERM) need not be given 10 s each.
            .arg("--shutdown-timeout=2")
            // Its own containerd namespaces, should the machine run a system containerd that
            // every node's dockerd would otherwise share (and clean up each other's tasks in).
            .arg(format!("--containerd-namespace={NETNS_PREFIX}{name}"))
            .arg(format!("--containerd-plugins-namespace={NETNS_PREFIX}{name}-plugins"));
        if api_on_tcp {
            // Docker 27 and later refuse a plain-text tcp listener unless told --tls=false.
            command.args(["-H", &format!("tcp://0.0.0.0:{API_PORT}"), "--tls=false"]);
        }
        let path = std::env::var("PATH").unwrap_or_default();
        command
            .env("PATH", format!("{0}/usr/sbin:{0}/usr/bin:{path}", root.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Its own session, so nothing aimed at the test's terminal reaches it before drop has
        // stopped it; and SIGTERM if the test process dies outright (nsenter execs dockerd,
        // which keeps the death signal).
        // SAFETY: setsid and prctl are async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(set_pdeathsig(Signal::SIGTERM)?)
            });
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("start dockerd in {name}: {e}"));
        let daemon = Self { child: Some(child), dir };
        daemon.wait_until_it_answers(name);
        daemon
    }

    fn sock(&self) -> String {
        format!("unix://{}", self.dir.join("d.sock").display())
    }

    fn wait_until_it_answers(&self, name: &str) {
        let deadline = Instant::now() + start_timeout();
        loop {
            let out = cmd::output(
                Command::new(docker28_cli()).args(["-H", &self.sock(), "version"]),
                Duration::from_secs(10),
            );
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd of {name} did not answer within {:?}:\n{}",
                start_timeout(),
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn stop(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            // The child is ours and not yet reaped: the pid is still dockerd's.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if cmd::wait_bounded(&mut child, stop_timeout()).is_none() {
                problems.push(format!("dockerd in {} ignored SIGTERM", self.dir.display()));
            }
        }
        let stopped = started.elapsed();
        if let Err(e) = clean_dir(&self.dir) {
            problems.push(e);
        }
        // The last node leaves no scratch directory behind (others' are still in it).
        let _ = fs::remove_dir(SCRATCH);
        // A slow stop is what makes this fixture slow: say where the time went.
        eprintln!(
            "swarm test bed: dockerd of {} stopped in {stopped:.1?}, removed in {:.1?}",
            self.dir.display(),
            started.elapsed()
        );
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- dockerd log of {} (last lines) ---\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        if let Err(e) = self.stop() {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

/// Kills whatever still runs from `dir` (containerd and its shims once dockerd is gone),
/// unmounts everything below it, deepest first, and removes it.
fn clean_dir(dir: &Path) -> Result<(), String> {
    kill_processes_using(dir);
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/mounts escapes blanks as \040; our paths have none.
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in &points {
        if try_run("umount", &[point]).is_err() {
            // Busy (a process that was just killed has not let go yet): detach it now.
            try_run("umount", &["-l", point])?;
        }
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(format!("remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// SIGKILL to every process whose command line names `dir`: the daemon's containerd and
/// containerd-shims (`-address DIR/exec/containerd/...`) that outlive a daemon killed outright.
fn kill_processes_using(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = fs::read_dir("/proc") else { return };
    let me = std::process::id();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    // Give the killed a moment to release their mounts.
    thread::sleep(Duration::from_millis(200));
}

/// What a run killed before its drops left: the nodes' daemons, their mounts and files
/// (their namespaces carry the test prefix and go with [`crate::netns::remove_leftovers`]).
pub(crate) fn remove_leftovers() {
    let Ok(entries) = fs::read_dir(SCRATCH) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        cmd::warn(format!("removing leftover swarm node {}", dir.display()));
        if let Some(pid) = fs::read_to_string(dir.join("dockerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + stop_timeout();
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
        }
        if let Err(e) = clean_dir(&dir) {
            cmd::warn(format!("leftover swarm node: {e}"));
        }
    }
    let _ = fs::remove_dir_all(SCRATCH);
    remove_leftover_policy_files();
}

/// The swarm tests' policy files, `$TMPDIR/guard-e2e-swarm-<tag>-<pid>.toml`, of runs that are
/// gone.
fn remove_leftover_policy_files() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(POLICY_PREFIX).and_then(|r| r.strip_suffix(".toml"))
        else {
            continue;
        };
        let Some((_, pid)) = rest.rsplit_once('-') else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            cmd::warn(format!("removing leftover policy file {}", entry.path().display()));
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// How the swarm tests name their policy files: `guard-e2e-swarm-<tag>-<pid>.toml` in $TMPDIR.
pub const POLICY_PREFIX: &str = "guard-e2e-swarm-";

// ---------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------

/// A swarm node: a host on the LAN with a Docker 28 daemon. Field order is drop order: the
/// daemon goes before its namespace.
pub struct Node {
    name: String,
    daemon: Daemon,
    host: LanHost,
}

impl Node {
    fn start(lan: &Netns, name: &str, addr: Ipv4Addr, api_on_tcp: bool) -> Self {
        let host = LanHost::new(lan, name, addr);
        let daemon = Daemon::start(&host, name, api_on_tcp);
        let node = Self { name: name.to_owned(), daemon, host };
        node.load_image(&image());
        node
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.host.addr()
    }

    pub fn host(&self) -> &LanHost {
        &self.host
    }

    pub fn netns(&self) -> &Netns {
        self.host.netns()
    }

    /// `unix://…/d.sock`: what DOCKER_HOST names for an agent of this node.
    pub fn docker_host(&self) -> String {
        self.daemon.sock()
    }

    /// Where an agent of this node runs: inside its namespace, against its daemon.
    pub fn place(&self) -> Place {
        Place { netns: self.netns().path(), docker_host: self.docker_host() }
    }

    /// The directory this node's daemon keeps its socket and state in.
    pub fn dir(&self) -> &Path {
        &self.daemon.dir
    }

    /// `docker -H NODE args` (the Docker 28 CLI), stdout; panics with stderr on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let sock = self.daemon.sock();
        let mut full = vec!["-H", &sock[..]];
        full.extend_from_slice(args);
        try_run(&docker28_cli().to_string_lossy(), &full)
    }

    /// `docker args`, the caller judges the exit status.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        cmd::output(
            Command::new(docker28_cli()).arg("-H").arg(self.daemon.sock()).args(args),
            cmd::command_timeout(),
        )
        .unwrap_or_else(|e| panic!("docker -H {} {args:?}: {e}", self.name))
    }

    /// This node's swarm id (empty before it is in a swarm).
    pub fn node_id(&self) -> String {
        self.docker(&["info", "--format", "{{.Swarm.NodeID}}"]).trim().to_owned()
    }

    /// Copies `image` from the machine's dockerd into this node's.
    pub fn load_image(&self, image: &str) {
        let save =
            cmd::output(Command::new(docker_bin()).args(["save", image]), cmd::command_timeout())
                .unwrap_or_else(|e| panic!("docker save {image}: {e}"));
        assert!(
            save.status.success(),
            "docker save {image} (the machine's dockerd): {}",
            String::from_utf8_lossy(&save.stderr)
        );
        let mut load = Command::new(docker28_cli())
            .arg("-H")
            .arg(self.daemon.sock())
            .arg("load")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("docker load: {e}"));
        {
            use std::io::Write;
            let mut stdin = load.stdin.take().unwrap();
            stdin.write_all(&save.stdout).unwrap_or_else(|e| panic!("docker load stdin: {e}"));
        }
        let out = load.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker load {image} into {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The swarm
// ---------------------------------------------------------------------------------------

#[derive(Default, Clone, Copy)]
pub struct SwarmOptions {
    /// n1's daemon also listens on tcp://0.0.0.0:2375, plain text (what issue 20 found open).
    pub api_on_tcp: bool,
}

/// n1 (manager, leader) and n2 (worker) in a swarm with an attachable overlay, an outside host
/// and an admin host, all on one LAN. Field order is drop order: nodes (and their daemons)
/// first, then the other hosts, the LAN last.
pub struct Swarm {
    nodes: Vec<Node>,
    outside: LanHost,
    admin: LanHost,
    lan: Netns,
    vni: u32,
}

impl Swarm {
    /// Builds the LAN, starts n1 and n2, makes the swarm (n1 the manager) and the overlay,
    /// and waits until both nodes are Ready.
    pub fn start(options: SwarmOptions) -> Self {
        let started = Instant::now();
        let _ = fs::create_dir_all(SCRATCH);
        let lan = Netns::new(&format!("{NETNS_PREFIX}lan"));
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        let outside = LanHost::new(&lan, "out", OUTSIDE);
        let admin = LanHost::new(&lan, "adm", ADMIN);
        let mut swarm = Swarm { nodes: Vec::new(), outside, admin, lan, vni: 0 };
        let n1 = Node::start(&swarm.lan, "n1", node_addr(1), options.api_on_tcp);
        n1.docker(&["swarm", "init", "--advertise-addr", &n1.addr().to_string()]);
        swarm.nodes.push(n1);
        let n2 = swarm.add_node("n2");
        swarm.join(&n2);
        swarm.nodes.push(n2);
        let manager = swarm.manager();
        manager.docker(&[
            "network",
            "create",
            "--driver=overlay",
            "--attachable",
            &format!("--subnet={OVERLAY_SUBNET}"),
            OVERLAY,
        ]);
        let vni = manager.docker(&[
            "network",
            "inspect",
            "--format",
            "{{index .Options \"com.docker.network.driver.overlay.vxlanid_list\"}}",
            OVERLAY,
        ]);
        swarm.vni = vni.trim().parse().unwrap_or_else(|e| panic!("overlay VNI {vni:?}: {e}"));
        swarm.wait_until_ready(&["n1", "n2"], start_timeout());
        eprintln!("swarm test bed: n1 and n2 in a swarm after {:.1?}", started.elapsed());
        swarm
    }

    /// A new node `name` (n3, ...) with its daemon and the test image, not yet in the swarm:
    /// [`Swarm::join`] it, then [`Swarm::adopt`] it.
    pub fn add_node(&self, name: &str) -> Node {
        let n: u8 = name.trim_start_matches('n').parse().expect("nodes are named nN");
        Node::start(&self.lan, name, node_addr(n), false)
    }

    /// `docker swarm join` of `node` as a worker, through n1.
    pub fn join(&self, node: &Node) {
        let manager = self.manager();
        let token = manager.docker(&["swarm", "join-token", "-q", "worker"]);
        let remote = format!("{}:2377", manager.addr());
        node.docker(&["swarm", "join", "--token", token.trim(), &remote]);
    }

    /// Keeps `node` (made by [`Swarm::add_node`]) with the others, so that it goes with them.
    pub fn adopt(&mut self, node: Node) {
        self.nodes.push(node);
    }

    /// The manager (n1).
    pub fn manager(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the swarm"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn outside(&self) -> &LanHost {
        &self.outside
    }

    pub fn admin(&self) -> &LanHost {
        &self.admin
    }

    /// The overlay's VXLAN network identifier (the engine's, from the network's options).
    pub fn vni(&self) -> u32 {
        self.vni
    }

    /// `docker -H NODE args`.
    pub fn docker(&self, node: &str, args: &[&str]) -> String {
        self.node(node).docker(args)
    }

    /// Every node's id and status, as the manager lists them (`docker node ls`).
    pub fn node_states(&self) -> Vec<(String, String)> {
        self.manager()
            .docker(&["node", "ls", "--format", "{{.ID}} {{.Status}}"])
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, status)| (id.to_owned(), status.to_owned()))
            .collect()
    }

    /// Waits until the manager lists each of `names` Ready; panics with `docker node ls`.
    pub fn wait_until_ready(&self, names: &[&str], within: Duration) {
        let ids: Vec<String> = names.iter().map(|n| self.node(n).node_id()).collect();
        let deadline = Instant::now() + within;
        loop {
            let states = self.node_states();
            let ready = |id: &String| states.iter().any(|(i, s)| i == id && s == "Ready");
            if ids.iter().all(ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {names:?} ({ids:?}) not all Ready within {within:?}: {states:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// `docker run -d` on `node`, attached to the overlay at `ip`; force-removed on drop.
    pub fn run_on(&self, node: &str, name: &str, ip: Ipv4Addr, command: &str) -> NodeContainer {
        let node = self.node(node);
        let name = format!("{NETNS_PREFIX}{name}");
        node.docker(&[
            "run",
            "-d",
            &format!("--name={name}"),
            &format!("--network={OVERLAY}"),
            &format!("--ip={ip}"),
            &image(),
            "sh",
            "-c",
            command,
        ]);
        NodeContainer { name, ip, docker: node.docker_host() }
    }

    /// Sends, from `from`, one UDP datagram to `to`'s VXLAN port carrying an Ethernet frame for
    /// `target` on the overlay: from `inner_src` (an address the overlay does not hold, with
    /// the MAC Docker would give it) to the container's MAC and address, UDP `inner_src_port`
    /// to `port`, with `payload`. All an attacker needs: VXLAN has no authentication.
    pub fn inject_udp(
        &self,
        from: &LanHost,
        to: &Node,
        target: &NodeContainer,
        inner_src: SocketAddrV4,
        port: u16,
        payload: &[u8],
    ) {
        let dst = SocketAddrV4::new(target.ip(), port);
        let l4 = raw::udp(SocketAddr::V4(inner_src), SocketAddr::V4(dst), payload);
        let ip = raw::ipv4(*inner_src.ip(), target.ip(), IPPROTO_UDP, None, &l4);
        let frame = raw::ethernet(
            overlay_mac(target.ip()),
            overlay_mac(*inner_src.ip()),
            &[],
            ETH_P_IP,
            &ip,
        );
        let datagram = vxlan(self.vni, &frame);
        let (src, dst) = (from.addr(), SocketAddrV4::new(to.addr(), VXLAN_PORT));
        from.run(|| {
            let socket = UdpSocket::bind((src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"));
            socket.send_to(&datagram, dst).unwrap_or_else(|e| panic!("send to {dst}: {e}"));
        });
    }

    /// Whether a frame injected from `from` into the overlay through `to`'s VXLAN port reaches
    /// `target`'s UDP port `port` within `within`: a UDP socket in the container's namespace
    /// (busybox has no UDP server) records what arrives, the datagram is sent every 250 ms.
    pub fn injection_delivered(
        &self,
        from: &LanHost,
        to: &Node,
        target: &NodeContainer,
        port: u16,
        within: Duration,
    ) -> bool {
        let inner_src = SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 99), 40000);
        let bind = SocketAddr::from((target.ip(), port));
        let sink = EchoServer::udp(target.netns_path(), bind, within + Duration::from_secs(1));
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            self.inject_udp(from, to, target, inner_src, port, b"guard-e2e overlay probe");
            thread::sleep(Duration::from_millis(250));
            if sink.peers().contains(&SocketAddr::V4(inner_src)) {
                return true;
            }
        }
        false
    }

    /// A swarm service of `replicas` tasks of the test image on the overlay, at most one per
    /// node, running `command`; removed on drop.
    pub fn service(&self, name: &str, replicas: u32, extra: &[&str], command: &str) -> Service {
        let name = format!("{NETNS_PREFIX}{name}");
        let mut args = vec![
            "service".to_owned(),
            "create".to_owned(),
            "--detach".to_owned(),
            "--no-resolve-image".to_owned(),
            format!("--name={name}"),
            format!("--replicas={replicas}"),
            "--replicas-max-per-node=1".to_owned(),
            // busybox as PID 1 ignores SIGTERM: no 10 s wait per task on removal.
            "--stop-grace-period=1s".to_owned(),
            format!("--network={OVERLAY}"),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args.extend([image(), "sh".to_owned(), "-c".to_owned(), command.to_owned()]);
        self.manager().docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Service { name, manager: self.manager().docker_host() }
    }
}

/// 10.77.0.1N: node N's address on the LAN.
pub fn node_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + n)
}

/// A container's MAC on an overlay: 02:42 and its IPv4 address (Docker's rule).
pub fn overlay_mac(ip: Ipv4Addr) -> raw::Mac {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// The VXLAN encapsulation of `frame` (RFC 7348): flags with the VNI-valid bit, the VNI.
pub fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut datagram = vec![0x08, 0, 0, 0];
    datagram.extend_from_slice(&(vni << 8).to_be_bytes());
    datagram.extend_from_slice(frame);
    datagram
}

/// A container on a node, force-removed on drop.
pub struct NodeContainer {
    name: String,
    ip: Ipv4Addr,
    docker: String,
}

impl NodeContainer {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn docker(&self, args: &[&str]) -> String {
        let mut full = vec!["-H", &self.docker[..]];
        full.extend_from_slice(args);
        run(&docker28_cli().to_string_lossy(), &full)
    }

    /// `/proc/PID/ns/net` of its main process.
    pub fn netns_path(&self) -> PathBuf {
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let pid = pid.trim();
        assert!(pid != "0", "{} is not running", self.name);
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }
}

impl Drop for NodeContainer {
    fn drop(&mut self) {
        let sock = self.docker.clone();
        if let Err(e) =
            try_run(&docker28_cli().to_string_lossy(), &["-H", &sock, "rm", "-f", "-v", &self.name])
        {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

/// A swarm service, removed on drop (through the manager it was created on).
pub struct Service {
    name: String,
    manager: String,
}

/// One running task of a service: the node it runs on and its container.
#[derive(Debug, Clone)]
pub struct Task {
    pub node: String,
    pub container: String,
    pub overlay_ip: Ipv4Addr,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The running tasks, as each node's daemon lists its containers.
    pub fn tasks(&self, swarm: &Swarm) -> Vec<Task> {
        let filter = format!("label=com.docker.swarm.service.name={}", self.name);
        let mut tasks = Vec::new();
        for node in swarm.nodes() {
            let Ok(ids) = node.try_docker(&["ps", "-q", "--filter", &filter]) else { continue };
            for id in ids.split_whitespace() {
                let format =
                    format!("{{{{(index .NetworkSettings.Networks \"{OVERLAY}\").IPAddress}}}}");
                let Ok(ip) = node.try_docker(&["inspect", "--format", &format, id]) else {
                    continue;
                };
                if let Ok(overlay_ip) = ip.trim().parse() {
                    tasks.push(Task {
                        node: node.name.clone(),
                        container: id.to_owned(),
                        overlay_ip,
                    });
                }
            }
        }
        tasks
    }

    /// Waits until a task runs on each node of `nodes`; returns them in that order.
    pub fn wait_for_tasks_on(&self, swarm: &Swarm, nodes: &[&str], within: Duration) -> Vec<Task> {
        let deadline = Instant::now() + within;
        loop {
            let tasks = self.tasks(swarm);
            let found: Vec<Task> =
                nodes.iter().filter_map(|n| tasks.iter().find(|t| t.node == *n).cloned()).collect();
            if found.len() == nodes.len() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "service {} has no task on each of {nodes:?} within {within:?}: {tasks:?}\n{}",
                self.name,
                swarm
                    .manager()
                    .try_docker(&["service", "ps", "--no-trunc", &self.name])
                    .unwrap_or_else(|e| e)
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let cli = docker28_cli().to_string_lossy().into_owned();
        if let Err(e) = try_run(&cli, &["-H", &self.manager, "service", "rm", &self.name]) {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The agent as a global service: deploy/stack.yaml
// ---------------------------------------------------------------------------------------

/// The stack's name: its service is `guard-e2e-stack_guard`.
pub const STACK: &str = "guard-e2e-stack";
/// The agent's image, as `cargo xtask image` tags it on the machine's dockerd.
pub const AGENT_IMAGE: &str = crate::container_agent::IMAGE;

/// deploy/stack.yaml deployed on the swarm with `docker stack deploy`, one agent per node,
/// with a test-only override file that changes where things are, never what the agent does:
/// each node's bind sources are its own (its daemon's socket, a pin directory, an empty
/// policy directory and a state directory), named by `{{.Node.ID}}` templates that Swarm
/// expands on the node (all nodes share one filesystem here, where real nodes have one each).
/// On Docker 28 the stack runs with the narrow capability set its comment offers.
///
/// Drop removes the stack, waits until every agent container is gone, unloads what each
/// agent pinned (with the host's guard, in the node's namespace) and removes the directories.
pub struct AgentStack {
    manager: String,
    /// Per node: its namespace, its daemon's socket and its pin directory as the host sees
    /// it (the agent pins under `/sys/fs/bpf/guard` in its container, where this is bound).
    nodes: Vec<(PathBuf, String, PathBuf)>,
    workdir: PathBuf,
}

impl AgentStack {
    /// Loads the agent image into every node, lays out each node's bind sources, deploys the
    /// stack and waits until every node's agent has logged its first sync.
    pub fn deploy(swarm: &Swarm) -> Self {
        let workdir = Path::new(SCRATCH).join("stack");
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(workdir.join("id")).unwrap();
        let pid = std::process::id();
        let mut stack = Self { manager: swarm.manager().docker_host(), nodes: Vec::new(), workdir };
        for node in swarm.nodes() {
            node.load_image(AGENT_IMAGE);
            let id = node.node_id();
            // SCRATCH/stack/id/ID -> the node's directory, which holds d.sock.
            let by_id = stack.workdir.join("id").join(&id);
            std::os::unix::fs::symlink(node.dir(), &by_id).unwrap();
            fs::create_dir_all(node.dir().join("etc")).unwrap();
            fs::create_dir_all(node.dir().join("state")).unwrap();
            let bpf = PathBuf::from(format!("/sys/fs/bpf/{NETNS_PREFIX}{pid}-stack-{id}"));
            fs::create_dir_all(&bpf).unwrap_or_else(|e| panic!("mkdir {}: {e}", bpf.display()));
            stack.nodes.push((node.netns().path(), node.docker_host(), bpf));
        }
        let by_id = format!("{}/id/{{{{.Node.ID}}}}", stack.workdir.display());
        let bpf = format!("/sys/fs/bpf/{NETNS_PREFIX}{pid}-stack-{{{{.Node.ID}}}}");
        let override_file = format!(
            "version: \"3.8\"\n\
             services:\n  \
               guard:\n    \
                 volumes:\n      \
                   - {{type: bind, source: \"{by_id}/d.sock\", target: /var/run/docker.sock, read_only: true}}\n      \
                   - {{type: bind, source: \"{bpf}\", target: /sys/fs/bpf}}\n      \
                   - {{type: bind, source: \"{by_id}/etc\", target: /etc/container-guard, read_only: true}}\n      \
                   - {{type: bind, source: \"{by_id}/state\", target: {}}}\n",
            crate::container_agent::STATE_DIR
        );
        fs::write(stack.workdir.join("override.yaml"), override_file).unwrap();
        let stack_file = crate::container_agent::workspace_file("deploy/stack.yaml");
        let text = fs::read_to_string(&stack_file).unwrap();
        fs::write(stack.workdir.join("stack.yaml"), crate::container_agent::narrow_variant(&text))
            .unwrap();
        let (base, over) = (stack.workdir.join("stack.yaml"), stack.workdir.join("override.yaml"));
        swarm.manager().docker(&[
            "stack",
            "deploy",
            "--resolve-image=never",
            "--detach=true",
            "-c",
            &base.to_string_lossy(),
            "-c",
            &over.to_string_lossy(),
            STACK,
        ]);
        stack.wait_ready(swarm);
        stack
    }

    fn service(&self) -> String {
        format!("{STACK}_guard")
    }

    /// The agent container on `node`, if one runs.
    pub fn container_on(&self, node: &Node) -> Option<String> {
        let filter = format!("label=com.docker.swarm.service.name={}", self.service());
        let ids = node.try_docker(&["ps", "-q", "--filter", &filter]).ok()?;
        ids.split_whitespace().next().map(str::to_owned)
    }

    /// What the agent on `node` has logged.
    pub fn logs_on(&self, node: &Node) -> String {
        let Some(id) = self.container_on(node) else { return String::new() };
        let out = node.docker_output(&["logs", &id]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    fn wait_ready(&self, swarm: &Swarm) {
        let deadline = Instant::now() + start_timeout();
        for node in swarm.nodes() {
            while !self.logs_on(node).contains(crate::agent::READY_MARKER) {
                assert!(
                    Instant::now() < deadline,
                    "the stack's agent on {} did not log `{}` within {:?}:\n{}\n{}",
                    node.name(),
                    crate::agent::READY_MARKER,
                    start_timeout(),
                    swarm
                        .manager()
                        .try_docker(&["service", "ps", "--no-trunc", &self.service()])
                        .unwrap_or_else(|e| e),
                    self.logs_on(node)
                );
                thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

impl Drop for AgentStack {
    fn drop(&mut self) {
        let cli = docker28_cli().to_string_lossy().into_owned();
        if let Err(e) = try_run(&cli, &["-H", &self.manager, "stack", "rm", STACK]) {
            cmd::warn(format!("cleanup: {e}"));
        }
        // The agents stop (their pins stay), then the pins are unloaded from the host.
        let filter = format!("label=com.docker.swarm.service.name={}", self.service());
        let deadline = Instant::now() + stop_timeout();
        for (_, sock, _) in &self.nodes {
            loop {
                let ids = try_run(&cli, &["-H", sock, "ps", "-aq", "--filter", &filter]);
                if ids.is_ok_and(|ids| ids.trim().is_empty()) || Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(250));
            }
        }
        for (netns, _, bpf) in &self.nodes {
            let pins = bpf.join("guard");
            if pins.exists() {
                let out = cmd::output(
                    Command::new("nsenter")
                        .arg(format!("--net={}", netns.display()))
                        .arg(crate::agent::guard_bin())
                        .args(["unload", "--pin-dir"])
                        .arg(&pins),
                    cmd::command_timeout(),
                );
                if !out.is_ok_and(|o| o.status.success()) {
                    cmd::warn(format!("cleanup: guard unload --pin-dir {}", pins.display()));
                }
            }
            let _ = fs::remove_dir_all(bpf);
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}
