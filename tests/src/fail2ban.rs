//! A real fail2ban (Debian's `fail2ban-server`) for one test: its own configuration
//! directory, socket, pid file, in-memory database and log in a scratch directory, one jail
//! watching a log file with the repository's container-guard action. It never touches the
//! system's fail2ban (if any runs), and is stopped on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    cmd,
    daemon::{Daemon, ScratchDir},
};

/// The test jail's name.
pub const JAIL: &str = "guard-test";
/// What the jail counts as a failure: `auth failure from ADDR` at the end of a line.
pub const FAILREGEX: &str = "auth failure from <HOST>$";
/// The action under test.
const ACTION: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/fail2ban/action.d/container-guard.conf"
));

/// How the jail bans.
pub struct Jail<'a> {
    /// The `guard` the action runs.
    pub guard: &'a Path,
    /// Its `guard_opts`: the agent's `--pin-dir` and `--state-dir`.
    pub guard_opts: &'a str,
    /// The log the jail watches.
    pub logpath: &'a Path,
    /// Seconds (-1: permanent).
    pub bantime: i64,
}

/// A running fail2ban-server. Field order is drop order: the server stops before its
/// directory goes.
pub struct Fail2ban {
    daemon: Daemon,
    conf: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    dir: ScratchDir,
}

impl Fail2ban {
    /// Starts fail2ban with one jail: maxretry 3 within findtime 60 s, then `jail.bantime`.
    pub fn start(jail: Jail) -> Self {
        let server = cmd::find_in_path("fail2ban-server").expect(
            "fail2ban-server not found: apt-get install -y fail2ban (cargo xtask setup does)",
        );
        let dir = ScratchDir::new("f2b");
        let root = dir.path().to_owned();
        let (socket, log) = (root.join("fail2ban.sock"), root.join("fail2ban.log"));
        dir.write(
            "conf/fail2ban.conf",
            &format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {}\nsyslogsocket = auto\nsocket = {}\npidfile = {}\ndbfile = :memory:\ndbpurgeage = 1d\nallowipv6 = auto\n",
                log.display(),
                socket.display(),
                root.join("fail2ban.pid").display()
            ),
        );
        // No date in the lines a container writes: each line counts when it is read.
        dir.write(
            "conf/filter.d/guard-test.conf",
            &format!("[Definition]\nfailregex = {FAILREGEX}\ndatepattern = {{NONE}}\n"),
        );
        dir.write("conf/action.d/container-guard.conf", ACTION);
        dir.write(
            "conf/jail.conf",
            &format!(
                "[{JAIL}]\nenabled = true\nfilter = guard-test\nlogpath = {}\nbackend = polling\nmaxretry = 3\nfindtime = 60\nbantime = {}\naction = container-guard[guard=\"{}\", guard_opts=\"{}\"]\n",
                jail.logpath.display(),
                jail.bantime,
                jail.guard.display(),
                jail.guard_opts
            ),
        );
        let conf = root.join("conf");
        let mut command = Command::new(server);
        command.arg("-f").arg("-x").arg("-c").arg(&conf).arg("-s").arg(&socket);
        command.arg("-p").arg(root.join("fail2ban.pid"));
        let daemon = Daemon::spawn("fail2ban-server", command, &root.join("server.out"));
        let f2b = Fail2ban { daemon, conf, socket, log, dir };
        f2b.wait_until(Duration::from_secs(20), "its jail started", |f| {
            f.client(&["status", JAIL]).is_ok()
        });
        f2b
    }

    /// `fail2ban-client ARGS` against this server.
    pub fn client(&self, args: &[&str]) -> Result<String, String> {
        let conf = self.conf.to_string_lossy();
        let socket = self.socket.to_string_lossy();
        let mut all = vec!["-c", &conf, "-s", &socket];
        all.extend_from_slice(args);
        cmd::try_run("fail2ban-client", &all)
    }

    /// The addresses the jail holds banned.
    pub fn banned(&self) -> Vec<String> {
        let status = self.client(&["status", JAIL]).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.split_once("Banned IP list:"))
            .map(|(_, list)| list.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// `fail2ban-client set JAIL unbanip ADDR`.
    pub fn unban(&self, addr: &str) {
        if let Err(e) = self.client(&["set", JAIL, "unbanip", addr]) {
            panic!("{e}\n{}", self.log());
        }
    }

    /// `fail2ban-client set JAIL banip ADDR`.
    pub fn ban(&self, addr: &str) {
        if let Err(e) = self.client(&["set", JAIL, "banip", addr]) {
            panic!("{e}\n{}", self.log());
        }
    }

    /// Waits until the jail holds `addr` banned.
    pub fn wait_banned(&self, addr: &str) {
        self.wait_until(Duration::from_secs(20), &format!("{addr} banned"), |f| {
            f.banned().iter().any(|b| b == addr)
        });
    }

    /// fail2ban's log and the server's output.
    pub fn log(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- fail2ban.log\n{}--- server output\n{}",
            read(&self.log),
            read(&self.dir.path().join("server.out"))
        )
    }

    fn wait_until(&self, within: Duration, what: &str, check: impl Fn(&Self) -> bool) {
        let every = Duration::from_millis(200);
        let done = crate::wait::poll_every(every, crate::patience(within), || check(self));
        assert!(done.is_some(), "fail2ban: not {what} within {within:?}\n{}", self.log());
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        if self.daemon.running() {
            // A clean stop, so that its shutdown (the jail's unbans) ends before the agent's.
            let _ = self.client(&["stop"]);
        }
        self.daemon.stop();
    }
}
