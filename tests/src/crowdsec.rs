//! A real CrowdSec local API (Debian's `crowdsec`, LAPI only: `-no-cs`, no agent, no
//! acquisition, no Central API) on a free loopback port for one test, with its own
//! configuration, SQLite database and logs in a scratch directory. `cscli` is pointed at the
//! same configuration, with a machine registered for it (`cscli decisions` go through the
//! LAPI). The system's CrowdSec, if any, is never touched. Stopped on drop.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::{
    cmd,
    daemon::{Daemon, ScratchDir},
};

/// A running LAPI. Field order is drop order.
pub struct Lapi {
    daemon: Daemon,
    config: PathBuf,
    port: u16,
    dir: ScratchDir,
}

impl Lapi {
    pub fn start() -> Self {
        for tool in ["crowdsec", "cscli"] {
            assert!(
                cmd::find_in_path(tool).is_some(),
                "`{tool}` not found: apt-get install -y crowdsec (cargo xtask setup does)"
            );
        }
        let dir = ScratchDir::new("crowdsec");
        let root = dir.path().to_owned();
        let port = free_loopback_port();
        for sub in ["data", "hub"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        dir.write("simulation.yaml", "simulation: off\n");
        // The LAPI loads profiles at start; `cscli decisions add` needs none of them.
        dir.write(
            "profiles.yaml",
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n",
        );
        dir.write("local_api_credentials.yaml", "");
        let config = dir.write("config.yaml", &config_yaml(&root.to_string_lossy(), port));
        let daemon = start_daemon(&config, &root);
        let lapi = Lapi { daemon, config, port, dir };
        lapi.wait_listening();
        // A machine for cscli: `cscli decisions add/delete` are LAPI requests.
        lapi.cscli(&[
            "machines",
            "add",
            "guard-e2e",
            "--auto",
            "--force",
            "-f",
            &root.join("local_api_credentials.yaml").to_string_lossy(),
            "--url",
            &lapi.url(),
        ]);
        lapi
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Registers a bouncer; its API key.
    pub fn add_bouncer(&self, name: &str) -> String {
        self.cscli(&["bouncers", "add", name, "-o", "raw"]).trim().to_owned()
    }

    /// `cscli decisions add -i ADDR -d DURATION` (a ban).
    pub fn ban(&self, addr: &str, duration: &str) {
        self.cscli(&["decisions", "add", "-i", addr, "-d", duration]);
    }

    /// `cscli decisions delete -i ADDR`.
    pub fn unban(&self, addr: &str) {
        self.cscli(&["decisions", "delete", "-i", addr]);
    }

    /// Stops the LAPI; [`Lapi::start_again`] brings it back on the same port and database.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    pub fn start_again(&mut self) {
        self.daemon = start_daemon(&self.config, self.dir.path());
        self.wait_listening();
    }

    /// The LAPI's logs.
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- crowdsec_api.log\n{}--- output\n{}",
            read("crowdsec_api.log"),
            read("crowdsec.out")
        )
    }

    /// `cscli -c CONFIG ARGS`; panics with the LAPI's log if it fails.
    pub fn cscli(&self, args: &[&str]) -> String {
        let config = self.config.to_string_lossy();
        let mut all = vec!["-c", &config, "--error"];
        all.extend_from_slice(args);
        cmd::try_run("cscli", &all).unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    fn wait_listening(&self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let within = crate::patience(Duration::from_secs(30));
        let listening = crate::wait::poll_every(Duration::from_millis(100), within, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(
            listening.is_some(),
            "the CrowdSec LAPI did not listen on {addr} within {within:?}\n{}",
            self.log()
        );
    }
}

fn start_daemon(config: &std::path::Path, root: &std::path::Path) -> Daemon {
    let mut command = Command::new("crowdsec");
    command.arg("-c").arg(config).arg("-no-cs");
    Daemon::spawn("crowdsec", command, &root.join("crowdsec.out"))
}

/// The LAPI's configuration: everything under `root`, no Central API, no metrics port.
fn config_yaml(root: &str, port: u16) -> String {
    format!(
        "common:
  daemonize: false
  log_media: file
  log_level: info
  log_dir: {root}/
config_paths:
  config_dir: {root}/
  data_dir: {root}/data/
  simulation_path: {root}/simulation.yaml
  hub_dir: {root}/hub/
  index_path: {root}/hub/.index.json
db_config:
  type: sqlite
  db_path: {root}/data/crowdsec.db
  use_wal: false
api:
  client:
    credentials_path: {root}/local_api_credentials.yaml
  server:
    listen_uri: 127.0.0.1:{port}
    profiles_path: {root}/profiles.yaml
prometheus:
  enabled: false
"
    )
}

/// A loopback port nothing listens on now.
fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().unwrap().port()
}
