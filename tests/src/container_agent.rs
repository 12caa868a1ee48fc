//! The agent as a container (issue 6): the image `cargo xtask image` builds, run by
//! docker-compose from the repository's own deploy/compose.yaml, so the test runs with exactly
//! the capabilities, mounts and options an operator gets. A small override file only names
//! the container, points the agent at the test bed's uplinks and its own pin directory, mounts
//! an empty policy directory (whatever /etc/container-guard holds on this machine must not
//! change the verdicts) and a state directory of its own at [`STATE_DIR`] (the state an agent
//! of this machine keeps in /var/lib/container-guard must neither be read nor overwritten, and
//! nothing is left there). Compose merges volumes by their path in the container, so these two
//! replace the host paths of the compose file's binds and keep everything else about them.
//!
//! The capabilities follow the engine: every deploy file grants SYS_ADMIN, which every engine
//! accepts, and offers the narrow BPF, PERFMON and NET_ADMIN in a comment for engines that
//! grant them. On such an engine (Docker 28) the agent runs from the compose file edited the
//! way that comment says ([`narrow_variant`]), so the narrow set is what gets tested there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::{READY_MARKER, guard_bin};
use crate::cmd::{self, find_in_path, try_run};
use crate::docker::{Engine, docker, docker_bin};

/// The capability set of every deploy file's active line: every engine grants it, and the
/// kernel accepts CAP_SYS_ADMIN in place of each capability of [`NARROW_CAPS`].
pub const WIDE_CAPS: &[&str] = &["SYS_ADMIN"];
/// The set every deploy file offers in a comment: Docker 28 grants it, Docker 20.10 refuses
/// CAP_BPF and CAP_PERFMON ("unknown capability").
pub const NARROW_CAPS: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];

/// The set the agent container runs with on `engine`: the narrow one wherever it is granted.
pub fn caps_for(engine: Engine) -> &'static [&'static str] {
    if engine.grants_bpf_caps() { NARROW_CAPS } else { WIDE_CAPS }
}

/// A deploy file as its comments tell the operator of a newer engine to edit it: the
/// commented capability line naming BPF (`# cap_add: [BPF, ...]`, `# add: ["BPF", ...]`) in
/// place of the active one naming SYS_ADMIN. Panics unless there is exactly one of each.
pub fn narrow_variant(text: &str) -> String {
    let is_cap_key = |line: &str| line.starts_with("cap_add: [") || line.starts_with("add: [");
    let active: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| is_cap_key(l.trim_start()) && l.contains("SYS_ADMIN"))
        .map(|(i, _)| i)
        .collect();
    let commented: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.trim_start().strip_prefix("# ").is_some_and(is_cap_key) && l.contains("BPF")
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(active.len(), 1, "want one active SYS_ADMIN capability line:\n{text}");
    assert_eq!(commented.len(), 1, "want one commented BPF capability line:\n{text}");
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i == active[0] {
            continue;
        }
        if i == commented[0] {
            out.push(line.replacen("# ", "", 1));
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\n") + "\n"
}

/// The tag `cargo xtask image` builds.
pub const IMAGE: &str = "container-guard:dev";
/// The compose project and the agent container's name (the test prefix: a killed run's
/// container is removed by the next run's leftover cleanup).
pub const PROJECT: &str = "guard-e2e-agent";
pub const CONTAINER: &str = "guard-e2e-agent";
/// The service in deploy/compose.yaml.
pub const SERVICE: &str = "guard";
/// The agent's state directory in the container (its `--state-dir` default), a read-write
/// bind in deploy/compose.yaml; the tests bind [`ContainerAgent::state_dir`] there.
pub const STATE_DIR: &str = "/var/lib/container-guard";
/// Not the default 9184: an agent an operator runs on this machine may hold that.
pub const METRICS_ADDR: &str = "127.0.0.1:19184";
/// Pin directories are `/sys/fs/bpf/guard-e2e-<pid>-ctr<n>`, like [`crate::agent`]'s: the pid
/// tells the leftover cleanup whether the run that made one is gone.
const PIN_PREFIX: &str = "guard-e2e-";
/// A cold `cargo build --release` of the static binary (eBPF included) takes minutes on two
/// cores; an up-to-date one a few seconds.
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Loading, attaching and the first sync take well under a second; `docker restart` adds the
/// container's own start.
const READY_TIMEOUT: Duration = Duration::from_secs(45);

/// The workspace root (tests/ is one of its members).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A file of the workspace, e.g. `deploy/compose.yaml`.
pub fn workspace_file(path: &str) -> PathBuf {
    workspace_root().join(path)
}

/// Runs `cargo xtask image` (the static build, the checks, `docker build`) once per test
/// process and returns the tag. Panics with its output if it fails.
pub fn build_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let started = Instant::now();
        let out = cmd::output(
            Command::new(&cargo).args(["xtask", "image"]).current_dir(workspace_root()),
            IMAGE_BUILD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("`cargo xtask image`: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "`cargo xtask image` failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let size = stdout.lines().rfind(|l| l.contains(" bytes")).unwrap_or_default();
        println!("cargo xtask image: {} ({:.0?})", size.trim(), started.elapsed());
    });
    IMAGE
}

/// The host's `guard` ([`guard_bin`]); a relative `GUARD_BIN` (`target/debug/guard`) is
/// taken from the workspace root, since tests run in tests/.
pub fn host_guard_bin() -> PathBuf {
    let bin = guard_bin();
    if bin.is_relative() && !bin.exists() { workspace_root().join(bin) } else { bin }
}

/// The docker-compose CLI (Debian's docker-compose, 1.29): panics if it is missing.
pub fn docker_compose_bin() -> PathBuf {
    find_in_path("docker-compose").unwrap_or_else(|| {
        panic!("docker-compose not found: apt-get install -y docker-compose (the tests need it)")
    })
}

/// `guard run` in a container started by docker-compose from deploy/compose.yaml. Drop stops
/// and removes the container and unloads whatever it pinned (from the host binary, if the
/// test did not get to [`ContainerAgent::unload`]).
pub struct ContainerAgent {
    pin_dir: PathBuf,
    /// deploy/compose.yaml, or its [`narrow_variant`] in the work directory.
    compose_file: PathBuf,
    /// Holds the override file, the empty policy directory and the state directory.
    workdir: PathBuf,
    unloaded: bool,
}

impl ContainerAgent {
    /// `docker-compose up -d` with the repository's compose file, guarding `ifaces` only
    /// (never every uplink: that would take the machine's real interfaces), and waits until
    /// the agent logs its first sync.
    pub fn start(ifaces: &[&str]) -> Self {
        assert!(!ifaces.is_empty(), "the test agent must be told its uplinks");
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{PIN_PREFIX}{pid}-ctr{n}"));
        let workdir = std::env::temp_dir().join(format!("guard-e2e-compose-{pid}-{n}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(workdir.join("config")).expect("create the compose work directory");
        let mut command = vec!["run".to_owned()];
        for iface in ifaces {
            command.extend(["--iface".to_owned(), (*iface).to_owned()]);
        }
        command.extend(["--pin-dir".to_owned(), pin_dir.display().to_string()]);
        command.extend(["--metrics-addr".to_owned(), METRICS_ADDR.to_owned()]);
        let override_file = format!(
            "services:\n  {SERVICE}:\n    container_name: {CONTAINER}\n    command: {}\n    \
             volumes:\n      - {}:/etc/container-guard:ro\n      - {}:{STATE_DIR}\n",
            serde_json::to_string(&command).unwrap(),
            workdir.join("config").display(),
            workdir.join("state").display()
        );
        fs::write(workdir.join("override.yaml"), override_file).expect("write the override file");
        let compose_file = compose_file_for(Engine::current(), &workdir);
        let agent = Self { pin_dir, compose_file, workdir, unloaded: false };
        agent.compose(&["up", "-d", "--no-build"]).unwrap_or_else(|e| panic!("{e}"));
        agent.wait_ready(1);
        agent
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The host directory bound at [`STATE_DIR`] (created by dockerd, as a missing bind
    /// source is on an operator's host; removed with the rest of the work directory).
    pub fn state_dir(&self) -> PathBuf {
        self.workdir.join("state")
    }

    /// The compose file the agent runs from: deploy/compose.yaml or its narrow variant.
    pub fn compose_file(&self) -> &Path {
        &self.compose_file
    }

    /// `docker-compose -p PROJECT -f deploy/compose.yaml -f override.yaml ARGS`, with
    /// GUARD_IMAGE set to the image under test; stdout, or the failure with stderr.
    fn compose(&self, args: &[&str]) -> Result<String, String> {
        let out = self.compose_output(args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`docker-compose {}` failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    fn compose_output(&self, args: &[&str]) -> Result<Output, String> {
        let mut command = Command::new(docker_compose_bin());
        command
            .args(["--project-name", PROJECT, "--file"])
            .arg(&self.compose_file)
            .arg("--file")
            .arg(self.workdir.join("override.yaml"))
            .args(args)
            .env("GUARD_IMAGE", IMAGE);
        cmd::output(&mut command, cmd::command_timeout())
            .map_err(|e| format!("`docker-compose {}`: {e}", args.join(" ")))
    }

    /// Everything the agent container has logged, over all its runs (`docker logs`).
    pub fn logs(&self) -> String {
        match cmd::output(
            Command::new(docker_bin()).args(["logs", CONTAINER]),
            cmd::command_timeout(),
        ) {
            Ok(out) => {
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr)
            }
            Err(e) => format!("(docker logs {CONTAINER}: {e})"),
        }
    }

    /// How often the agent has logged its first sync: once per run of the container.
    fn ready_count(&self) -> usize {
        self.logs().matches(READY_MARKER).count()
    }

    /// `docker inspect` of the agent container.
    pub fn inspect(&self) -> Value {
        let out = docker(&["inspect", CONTAINER]);
        let v: Value = serde_json::from_str(&out).expect("parse docker inspect");
        v[0].clone()
    }

    /// Waits until the agent has logged [`READY_MARKER`] `runs` times in all; panics with
    /// the log if the container stops or it takes longer than [`READY_TIMEOUT`].
    fn wait_ready(&self, runs: usize) {
        let ready = crate::wait::poll_every(Duration::from_millis(100), READY_TIMEOUT, || {
            if self.ready_count() >= runs {
                return true;
            }
            let state = self.inspect()["State"].clone();
            let restarting = state["Restarting"].as_bool() == Some(true);
            assert!(
                state["Running"].as_bool() == Some(true) || restarting,
                "the agent container stopped ({}) before `{READY_MARKER}`:\n{}",
                state,
                self.logs()
            );
            false
        });
        assert!(
            ready.is_some(),
            "the agent container did not log `{READY_MARKER}` (run {runs}) within \
             {READY_TIMEOUT:?}:\n{}",
            self.logs()
        );
    }

    /// `docker restart` of the agent container; returns once the new run has synced, with
    /// how long that took and the new run's log.
    pub fn restart(&self) -> (Duration, String) {
        let before = self.logs();
        let runs = before.matches(READY_MARKER).count();
        let started = Instant::now();
        docker(&["restart", "--time", "10", CONTAINER]);
        self.wait_ready(runs + 1);
        let elapsed = started.elapsed();
        let logs = self.logs();
        let this_run = logs.get(before.len()..).unwrap_or(&logs).to_owned();
        (elapsed, this_run)
    }

    /// `docker exec` of `/guard ARGS` in the running agent container: the same
    /// capabilities, mounts and network as the agent. (`docker-compose run` cannot start a
    /// second container of a host-network service: compose 1.29 adds links to it, which
    /// dockerd refuses next to host networking.)
    pub fn exec(&self, args: &[&str]) -> Output {
        cmd::output(
            Command::new(docker_bin()).args(["exec", CONTAINER, "/guard"]).args(args),
            cmd::command_timeout(),
        )
        .unwrap_or_else(|e| panic!("docker exec {CONTAINER} /guard {args:?}: {e}"))
    }

    /// Stops the agent container the way compose does (SIGTERM), asserts the agent exited
    /// cleanly, and removes it. The pinned protection stays.
    pub fn stop(&self) {
        self.compose(&["stop"]).unwrap_or_else(|e| panic!("{e}"));
        let state = self.inspect()["State"].clone();
        assert_eq!(
            state["ExitCode"].as_i64(),
            Some(0),
            "the agent did not exit cleanly on SIGTERM ({state}):\n{}",
            self.logs()
        );
        self.compose(&["down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops the container if it still runs, then `guard unload` from the image, in a
    /// container that gets nothing but bpffs: removing pins is unlinking files, which needs
    /// no capability. Asserts the pin directory is gone.
    pub fn unload(mut self) {
        if self.container_exists() {
            self.stop();
        }
        let pin_dir = self.pin_dir.display().to_string();
        let bpffs = "/sys/fs/bpf:/sys/fs/bpf";
        let out = cmd::output(
            Command::new(docker_bin())
                .args(["run", "--rm", "--network", "none", "--cap-drop", "ALL", "--read-only"])
                .args(["--volume", bpffs, IMAGE, "unload", "--pin-dir", &pin_dir]),
            cmd::command_timeout(),
        )
        .unwrap_or_else(|e| panic!("docker run {IMAGE} unload: {e}"));
        self.unloaded = true;
        assert!(
            out.status.success(),
            "`guard unload` in the image failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        println!("guard unload (image): {}", String::from_utf8_lossy(&out.stdout).trim());
        assert!(!self.pin_dir.exists(), "`guard unload` left {pin_dir} behind");
    }

    fn container_exists(&self) -> bool {
        try_run(docker_bin(), &["inspect", "--format", "{{.Id}}", CONTAINER]).is_ok()
    }
}

/// deploy/compose.yaml as it is, or, on an engine that grants [`NARROW_CAPS`], its
/// [`narrow_variant`] written into `workdir`.
fn compose_file_for(engine: Engine, workdir: &Path) -> PathBuf {
    let file = workspace_file("deploy/compose.yaml");
    if caps_for(engine) == WIDE_CAPS {
        return file;
    }
    let text = fs::read_to_string(&file).expect("read deploy/compose.yaml");
    let variant = workdir.join("compose.yaml");
    fs::write(&variant, narrow_variant(&text)).expect("write the compose file's narrow variant");
    variant
}

impl Drop for ContainerAgent {
    fn drop(&mut self) {
        let failing = thread::panicking();
        if failing && self.container_exists() {
            eprintln!("--- agent container log ---\n{}", self.logs());
        }
        if self.container_exists()
            && let Err(e) = self.compose(&["down"])
        {
            cmd::warn(format!("cleanup: {e}"));
            let _ = try_run(docker_bin(), &["rm", "-f", CONTAINER]);
        }
        if !self.unloaded && self.pin_dir.exists() {
            // The host binary: the image may be what is broken.
            let dir = self.pin_dir.display().to_string();
            let unloaded =
                try_run(&host_guard_bin().to_string_lossy(), &["unload", "--pin-dir", &dir]);
            if let Err(e) = unloaded {
                cmd::warn(format!("cleanup: {e}"));
                let _ = fs::remove_dir_all(&self.pin_dir);
            }
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}
