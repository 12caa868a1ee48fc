//! The agent as a container (issue 6): the image built with `cargo xtask image` (a static
//! binary, `docker build` FROM scratch), run by docker-compose from deploy/compose.yaml, so with
//! exactly its capabilities and mounts, against the real dockerd and the seed scenario; and
//! the three deployment files, validated offline.
//!
//! On Docker 28 the agent runs with the narrow capability set (the deploy files' commented
//! alternative), on 20.10 with SYS_ADMIN; `cargo xtask test --engine docker28` runs the
//! seed scenario here against Docker 28.
//!
//! Needs root, a running dockerd, the busybox test image, docker-compose (Debian), a docker CLI
//! with `docker stack config` and kubernetes-validate (PyPI). `cargo xtask test` runs these
//! with the e2e tier, one at a time (`--test-threads=1`). A missing tool fails the test with
//! what to install; nothing is skipped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::cmd::{self, find_in_path};
use tests::container_agent::{
    CONTAINER, ContainerAgent, METRICS_ADDR, NARROW_CAPS, STATE_DIR, WIDE_CAPS, build_image,
    caps_for, docker_compose_bin, narrow_variant, workspace_file,
};
use tests::docker::{Engine, docker};
use tests::observe::{self, GuardObjects};
use tests::probe::PATIENT;
use tests::prober::{Outcome, Prober, summarize};
use tests::seed::SeedBed;

/// The capability set every deployment file grants on its active line (after dropping all).
/// On Docker Engine 20.10 it is the only set that works: the engine rejects CAP_BPF and
/// CAP_PERFMON ("unknown capability"), and its default seccomp profile allows bpf(2) only to
/// a container with CAP_SYS_ADMIN; the kernel accepts CAP_SYS_ADMIN in place of CAP_BPF,
/// CAP_PERFMON and CAP_NET_ADMIN. README.md ("Run it as a container") has what breaks
/// without it. Each file offers [`NARROW_CAPS`] in a comment, for Docker 28.
const CAPS: &[&str] = WIDE_CAPS;
/// Where the agent's inputs live on the host, mounted at the same path in the container; the
/// state directory ([`STATE_DIR`]) too, read-write: the last good state, so that a restart or
/// a broken policy file at start never means starting from nothing.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const BPFFS: &str = "/sys/fs/bpf";
const POLICY_DIR: &str = "/etc/container-guard";
/// Every mount of every deployment: host path (= path in the container), read-only.
const MOUNTS: &[(&str, bool)] =
    &[(DOCKER_SOCKET, true), (BPFFS, false), (POLICY_DIR, true), (STATE_DIR, false)];
const DEFAULT_METRICS: &str = "127.0.0.1:9184";

// ---------------------------------------------------------------------------------------
// The deployment files: what they grant, and that their tools accept them.
// ---------------------------------------------------------------------------------------

/// The YAML documents of a deployment file, as JSON, parsed by PyYAML (Debian's
/// python3-yaml, which docker-compose depends on).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let python = if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        find_in_path("python3").expect("python3 not found: apt-get install -y python3-yaml")
    };
    let script = "import json, sys, yaml\n\
                  json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)";
    let out =
        cmd::output(Command::new(&python).args(["-c", script]).arg(path), cmd::command_timeout())
            .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'yaml'"),
        "{} has no PyYAML: apt-get install -y python3-yaml",
        python.display()
    );
    assert!(out.status.success(), "{} does not parse as YAML: {stderr}", path.display());
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("expected a string, got {s}")).to_owned())
        .collect()
}

fn caps() -> Vec<String> {
    CAPS.iter().map(|c| (*c).to_owned()).collect()
}

fn narrow_caps() -> Vec<String> {
    NARROW_CAPS.iter().map(|c| (*c).to_owned()).collect()
}

/// A deploy file's [`narrow_variant`], written next to nothing the tools could pick up (a
/// scratch directory of its own), for the parsers and validators.
fn write_narrow_variant(path: &Path) -> (tempdir::Scratch, PathBuf) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let scratch = tempdir::Scratch::new();
    let variant = scratch.0.join(path.file_name().expect("file name"));
    std::fs::write(&variant, narrow_variant(&text)).expect("write the narrow variant");
    (scratch, variant)
}

/// The deploy file's narrow variant is `docs` but for the capabilities added at `caps_at` (a
/// JSON pointer into its documents), which are exactly [`NARROW_CAPS`] there.
fn check_narrow_variant(path: &Path, docs: &[Value], caps_at: &str) {
    let (_scratch, variant) = write_narrow_variant(path);
    let mut narrow = Value::from(yaml_documents(&variant));
    let added = narrow.pointer_mut(caps_at).unwrap_or_else(|| panic!("no {caps_at}"));
    assert_eq!(strings(added), narrow_caps());
    *added = json!(CAPS);
    assert_eq!(narrow, Value::from(docs), "the narrow variant differs in more than {caps_at}");
}

mod tempdir {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system's temporary directory, removed on drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("guard-e2e-deploy-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create a scratch directory");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// [`MOUNTS`] as `docker run -v` / compose short syntax (`HOST:CONTAINER[:ro]`), sorted.
fn bind_flags() -> Vec<String> {
    let mut binds: Vec<String> = MOUNTS
        .iter()
        .map(|(path, ro)| format!("{path}:{path}{}", if *ro { ":ro" } else { "" }))
        .collect();
    binds.sort();
    binds
}

/// `--metrics-addr` of a `guard run` command line (its default if absent).
fn metrics_addr(command: &[String]) -> String {
    assert_eq!(command.first().map(String::as_str), Some("run"), "not `guard run`: {command:?}");
    command
        .windows(2)
        .find(|w| w[0] == "--metrics-addr")
        .map_or(DEFAULT_METRICS.to_owned(), |w| w[1].clone())
}

/// The compose file's service: no privileged, host network, all capabilities dropped and
/// exactly [`CAPS`] added, read-only root, no-new-privileges, default seccomp, exactly
/// [`MOUNTS`] at the same paths (the socket and the policy directory read-only, bpffs and the
/// state directory read-write), restarted unless stopped.
#[test]
fn compose_file_grants_exactly_the_least_privilege_set() {
    let path = workspace_file("deploy/compose.yaml");
    let docs = yaml_documents(&path);
    let services = docs[0]["services"].as_object().expect("services");
    assert_eq!(services.len(), 1, "one service: {:?}", services.keys());
    let guard = &docs[0]["services"]["guard"];
    assert_eq!(guard["privileged"], json!(false), "privileged must be (explicitly) false");
    assert_eq!(guard["network_mode"], "host");
    assert_eq!(strings(&guard["cap_drop"]), ["ALL"]);
    assert_eq!(strings(&guard["cap_add"]), caps());
    assert_eq!(guard["read_only"], json!(true));
    assert_eq!(guard["restart"], "unless-stopped");
    let security = strings(&guard["security_opt"]);
    assert!(security.contains(&"no-new-privileges:true".to_owned()), "{security:?}");
    assert!(
        !security.iter().any(|s| s.contains("unconfined")),
        "the default seccomp profile suffices: {security:?}"
    );
    let mut volumes = strings(&guard["volumes"]);
    volumes.sort();
    assert_eq!(volumes, bind_flags(), "exactly these mounts");
    assert_eq!(metrics_addr(&strings(&guard["command"])), DEFAULT_METRICS);
    for key in ["pid", "ipc", "devices", "userns_mode", "cgroup_parent"] {
        assert!(guard.get(key).is_none(), "compose service sets {key}");
    }
    // The commented alternative: the narrow set, and nothing else changed.
    check_narrow_variant(&path, &docs, "/0/services/guard/cap_add");
}

/// The Swarm stack: a global service with the same capabilities and binds on the host
/// network, and none of the keys `docker stack deploy` ignores (a privilege it silently drops
/// would mean a different agent than the one tested).
#[test]
fn stack_file_grants_exactly_the_least_privilege_set() {
    let docs = yaml_documents(&workspace_file("deploy/stack.yaml"));
    let stack = &docs[0];
    let guard = &stack["services"]["guard"];
    assert_eq!(strings(&guard["cap_drop"]), ["ALL"]);
    assert_eq!(strings(&guard["cap_add"]), caps());
    assert_eq!(guard["read_only"], json!(true));
    assert_eq!(guard["deploy"]["mode"], "global");
    assert_eq!(strings(&guard["networks"]), ["host"]);
    assert_eq!(stack["networks"]["host"], json!({"external": true, "name": "host"}));
    // What Docker 20.10's `docker stack deploy` reports as "Ignoring unsupported options".
    for ignored in [
        "build",
        "cgroup_parent",
        "devices",
        "domainname",
        "external_links",
        "ipc",
        "links",
        "mac_address",
        "network_mode",
        "pid",
        "privileged",
        "restart",
        "security_opt",
        "shm_size",
        "userns_mode",
    ] {
        assert!(guard.get(ignored).is_none(), "Swarm ignores `{ignored}`: leave it out");
    }
    let binds: BTreeMap<String, (String, bool)> = guard["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            assert_eq!(v["type"], "bind", "{v}");
            let target = v["target"].as_str().expect("target").to_owned();
            let source = v["source"].as_str().expect("source").to_owned();
            (target, (source, v["read_only"].as_bool().unwrap_or(false)))
        })
        .collect();
    assert_eq!(guard["volumes"].as_array().unwrap().len(), MOUNTS.len(), "one bind per target");
    let expected: BTreeMap<String, (String, bool)> =
        MOUNTS.iter().map(|(p, ro)| ((*p).to_owned(), ((*p).to_owned(), *ro))).collect();
    assert_eq!(binds, expected);
    assert_eq!(metrics_addr(&strings(&guard["command"])), DEFAULT_METRICS);
    check_narrow_variant(&workspace_file("deploy/stack.yaml"), &docs, "/0/services/guard/cap_add");
}

/// The DaemonSet: every node (tolerates every taint), host network, the same capabilities,
/// exactly [`MOUNTS`] as hostPath volumes at the same paths (the state directory created if
/// missing), probes on /healthz at the agent's metrics address, requests and limits, in its
/// own namespace.
#[test]
fn daemonset_grants_exactly_the_least_privilege_set() {
    let docs = yaml_documents(&workspace_file("deploy/daemonset.yaml"));
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Namespace", "DaemonSet"]);
    let (namespace, ds) = (&docs[0], &docs[1]);
    assert_eq!(ds["metadata"]["namespace"], namespace["metadata"]["name"]);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], json!(true));
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]), "run on every node");
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], json!(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"]), caps());
    assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");

    let volumes = pod["volumes"].as_array().expect("volumes");
    let host_paths: BTreeMap<&str, &str> = volumes
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["hostPath"]["path"].as_str().unwrap()))
        .collect();
    let volume_mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert_eq!(volumes.len(), MOUNTS.len(), "exactly these volumes: {volumes:?}");
    assert_eq!(volume_mounts.len(), MOUNTS.len(), "exactly these mounts: {volume_mounts:?}");
    let mounts: BTreeMap<&str, (&str, bool)> = volume_mounts
        .iter()
        .map(|m| {
            let path = host_paths[m["name"].as_str().unwrap()];
            (path, (m["mountPath"].as_str().unwrap(), m["readOnly"].as_bool().unwrap_or(false)))
        })
        .collect();
    let expected: BTreeMap<&str, (&str, bool)> =
        MOUNTS.iter().map(|(p, ro)| (*p, (*p, *ro))).collect();
    assert_eq!(mounts, expected);
    let state = volumes.iter().find(|v| v["hostPath"]["path"] == STATE_DIR).unwrap();
    assert_eq!(state["hostPath"]["type"], "DirectoryOrCreate", "{state}");

    let metrics = metrics_addr(&strings(&c["args"]));
    let (host, port) = metrics.rsplit_once(':').unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["host"], host, "{probe}: the agent listens on {metrics}");
        assert_eq!(get["port"].to_string(), port, "{probe}: the agent listens on {metrics}");
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(c["resources"][kind][resource].is_string(), "no {kind}.{resource}");
        }
    }
    check_narrow_variant(
        &workspace_file("deploy/daemonset.yaml"),
        &docs,
        "/1/spec/template/spec/containers/0/securityContext/capabilities/add",
    );
}

/// The README's `docker run` line grants the same set (the docs are what operators copy).
#[test]
fn readme_docker_run_grants_the_same_set() {
    let readme = std::fs::read_to_string(workspace_file("README.md")).expect("README.md");
    let section = readme
        .split("## Run it as a container")
        .nth(1)
        .expect("README.md has a `## Run it as a container` section");
    let run: String = section
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("docker run"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!run.is_empty(), "no `docker run` command in the section");
    let mut granted: Vec<String> = run
        .split("--cap-add ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
        .map(String::from)
        .collect();
    granted.sort();
    assert_eq!(granted, caps(), "README: {run}");
    for flag in ["--cap-drop ALL", "--network host", "--read-only"] {
        assert!(run.contains(flag), "README's docker run lacks `{flag}`: {run}");
    }
    let words: Vec<&str> = run.split_whitespace().collect();
    let mut binds: Vec<String> = words
        .windows(2)
        .filter(|w| ["-v", "--volume", "--mount"].contains(&w[0]))
        .map(|w| w[1].to_owned())
        .collect();
    binds.sort();
    assert_eq!(binds, bind_flags(), "README's docker run mounts exactly these: {run}");
    assert!(!run.contains("--privileged"), "README: {run}");
}

/// `tool` (a validator, run as `command`) must accept the deploy file at `path`.
fn assert_accepts(tool: &str, command: &mut Command, path: &Path) {
    let out =
        cmd::output(command, cmd::command_timeout()).unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker-compose config` (Debian's docker-compose 1.29) must accept the file.
fn assert_compose_config_accepts(path: &Path) {
    let mut config = Command::new(docker_compose_bin());
    config.arg("--file").arg(path).args(["config", "--quiet"]);
    assert_accepts("docker-compose config", &mut config, path);
}

#[test]
fn compose_file_validates() {
    let path = workspace_file("deploy/compose.yaml");
    assert_compose_config_accepts(&path);
    let (_scratch, variant) = write_narrow_variant(&path);
    assert_compose_config_accepts(&variant);
}

/// The stack file passes `docker stack config` (the compose v3 schema of the docker CLI that
/// deploys stacks; Debian's 20.10 client lacks the command, so a newer one is looked for) and
/// `docker-compose config` (the v3.8 schema, deploy keys included).
#[test]
fn stack_file_validates() {
    let path = workspace_file("deploy/stack.yaml");
    let candidates = ["/usr/local/bin/docker", "/usr/bin/docker"]
        .into_iter()
        .map(PathBuf::from)
        .chain(find_in_path("docker"));
    let client = candidates
        .filter(|c| c.is_file())
        .find(|c| {
            cmd::output(Command::new(c).args(["stack", "config", "--help"]), cmd::command_timeout())
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--compose-file"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no docker CLI with `docker stack config` (Debian's 20.10 has none; docker CLI \
                 23 or later does): install one as /usr/local/bin/docker"
            )
        });
    let (_scratch, variant) = write_narrow_variant(&path);
    for path in [&path, &variant] {
        let mut config = Command::new(&client);
        config.args(["stack", "config", "--compose-file"]).arg(path);
        assert_accepts(&format!("`{} stack config`", client.display()), &mut config, path);
        assert_compose_config_accepts(path);
    }
}

/// The `kubernetes-validate` script, or its module through python3 when pip put the script
/// somewhere off PATH; panics with what to install if neither is there.
fn kubernetes_validate() -> Command {
    if let Some(script) = find_in_path("kubernetes-validate") {
        return Command::new(script);
    }
    let python = find_in_path("python3").unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
    let importable = cmd::output(
        Command::new(&python).args(["-c", "import kubernetes_validate"]),
        cmd::command_timeout(),
    )
    .is_ok_and(|o| o.status.success());
    assert!(
        importable,
        "kubernetes-validate not found: python3 -m pip install kubernetes-validate (PyPI; it \
         ships the Kubernetes schemas, no network needed to validate)"
    );
    let mut command = Command::new(python);
    command.args(["-m", "kubernetes_validate"]);
    command
}

/// `kubernetes-validate --strict` accepts the DaemonSet and its namespace, offline, against
/// the newest Kubernetes schema it ships and an older one still in wide use; its narrow
/// variant too.
#[test]
fn daemonset_validates() {
    let file = workspace_file("deploy/daemonset.yaml");
    let (_scratch, variant) = write_narrow_variant(&file);
    for (path, version) in
        [(&file, None), (&file, Some("1.28.0")), (&variant, None), (&variant, Some("1.28.0"))]
    {
        let mut command = kubernetes_validate();
        command.arg("--strict");
        if let Some(version) = version {
            command.args(["--kubernetes-version", version]);
        }
        let out = cmd::output(command.arg(path), cmd::command_timeout())
            .unwrap_or_else(|e| panic!("kubernetes-validate: {e}"));
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        println!("{}", report.trim());
        assert!(out.status.success(), "kubernetes-validate rejects {}: {report}", path.display());
        assert_eq!(report.matches("passed").count(), 2, "both resources validated: {report}");
    }
}

// ---------------------------------------------------------------------------------------
// The containerised agent against the seed scenario.
// ---------------------------------------------------------------------------------------

/// The image: entrypoint /guard, nothing but the binary, and `guard --help` runs in it.
fn check_image(image: &str) {
    let inspect: Value = serde_json::from_str(&docker(&["image", "inspect", image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["Entrypoint"], json!(["/guard"]), "{config}");
    let size = inspect[0]["Size"].as_u64().unwrap();
    println!("image {image}: {size} bytes ({:.1} MiB)", size as f64 / 1_048_576.0);
    let help = docker(&["run", "--rm", "--network", "none", image, "--help"]);
    assert!(help.contains("Usage: guard"), "{help}");
}

/// The running agent container has exactly the compose file's privileges: [`CAPS`], or the
/// narrow set where the engine grants it.
fn check_privileges(agent: &ContainerAgent) {
    let caps = caps_for(Engine::current());
    println!("agent container capabilities: {caps:?} (from {})", agent.compose_file().display());
    let host = agent.inspect()["HostConfig"].clone();
    let mut granted = strings(&host["CapAdd"]);
    granted.sort();
    let mut wanted: Vec<&str> = caps.to_vec();
    wanted.sort_unstable();
    assert_eq!(granted, wanted, "{host}");
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    assert_eq!(host["Privileged"], json!(false));
    assert_eq!(host["NetworkMode"], "host");
    assert_eq!(host["ReadonlyRootfs"], json!(true));
    assert_eq!(host["PidMode"], "", "the host's pid namespace is not needed");
    let security = strings(&host["SecurityOpt"]);
    assert_eq!(security, ["no-new-privileges:true"], "default seccomp, nothing loosened");
    // Exactly the compose file's mounts, read-write only where it says so (the test's override
    // changes the host side of the policy and state directories, nothing else).
    let mounts: BTreeMap<String, bool> = agent.inspect()["Mounts"]
        .as_array()
        .expect("Mounts")
        .iter()
        .map(|m| {
            assert_eq!(m["Type"], "bind", "{m}");
            (m["Destination"].as_str().unwrap().to_owned(), !m["RW"].as_bool().unwrap())
        })
        .collect();
    let expected: BTreeMap<String, bool> =
        MOUNTS.iter().map(|(p, ro)| ((*p).to_owned(), *ro)).collect();
    assert_eq!(mounts, expected, "the agent container's mounts (destination, read-only)");
    // The kernel's view: the agent process holds exactly those capabilities.
    let pid = agent.inspect()["State"]["Pid"].as_u64().expect("agent pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default()
    };
    let mask = caps.iter().map(|c| 1u64 << cap_number(c)).fold(0, |a, b| a | b);
    assert_eq!(u64::from_str_radix(field("CapEff:"), 16), Ok(mask), "{status}");
    assert_eq!(u64::from_str_radix(field("CapBnd:"), 16), Ok(mask), "{status}");
    assert_eq!(field("Seccomp:"), "2", "the default seccomp filter applies");
    assert_eq!(field("NoNewPrivs:"), "1");
}

/// The kernel's number of a capability the deploy files name (linux/capability.h).
fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => panic!("capability {name} is not one the deploy files name"),
    }
}

/// The agent wrote its state through the read-write bind despite the read-only root: a
/// `state.json` (0600) holding Docker's snapshot, the seed containers included, and no
/// warning about the state directory in its log.
fn check_state(agent: &ContainerAgent, bed: &SeedBed) {
    let path = agent.state_dir().join("state.json");
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| {
        panic!("the containerised agent wrote no {}: {e}\n{}", path.display(), agent.logs())
    });
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", path.display());
    let text = std::fs::read_to_string(&path).expect("read state.json");
    let saved: Value = serde_json::from_str(&text).expect("state.json is JSON");
    let names: Vec<&str> = saved["snapshot"]["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("no snapshot.containers in state.json: {saved}"))
        .iter()
        .filter_map(|c| c["name"].as_str())
        .map(|n| n.trim_start_matches('/'))
        .collect();
    let db = bed.project.db.name();
    assert!(names.contains(&db), "state.json does not hold {db}: {names:?}");
    let logs = agent.logs();
    for warning in ["state directory", "cannot save the state"] {
        assert!(!logs.contains(warning), "the agent warned about its state (`{warning}`):\n{logs}");
    }
}

/// The seed scenario with the agent as a container: outside hosts reach only what the labels
/// open, over every path and both families; the host and the containers are untouched;
/// `guard status` works in the agent's container; the stopped container leaves protection in place, and
/// `guard unload` from the image removes every pin, link, program and map.
#[test]
fn containerised_agent_passes_the_seed_scenario() {
    let image = build_image();
    check_image(image);
    let bed = SeedBed::new();
    let db_exposed = bed.db_exposed_to_a();
    assert!(
        bed.a.tcp_connect(db_exposed, PATIENT),
        "test bed broken: A cannot reach {db_exposed} unguarded"
    );

    let before = GuardObjects::list();
    let host_state_existed = Path::new(STATE_DIR).exists();
    let agent = ContainerAgent::start(&bed.uplinks());
    let created = GuardObjects::list().since(&before);
    check_privileges(&agent);
    check_state(&agent, &bed);
    bed.check_outside(true);
    bed.check_inside();

    let health = observe::http_get(METRICS_ADDR.parse().unwrap(), "/healthz");
    assert_eq!(health.as_deref().map(str::trim), Ok("ok"), "/healthz of the container");

    let pin_dir = agent.pin_dir().display().to_string();
    let status = agent.exec(&["status", "--pin-dir", &pin_dir]);
    let status_text = String::from_utf8_lossy(&status.stdout);
    println!("guard status (docker exec):\n{status_text}");
    assert!(status.status.success(), "status: {}", String::from_utf8_lossy(&status.stderr));
    assert!(status_text.contains("maps: in sync with Docker"), "{status_text}");
    for uplink in bed.uplinks() {
        assert!(status_text.contains(uplink), "status does not name {uplink}: {status_text}");
    }
    assert!(status_text.contains(bed.project.db.name()), "{status_text}");

    agent.stop();
    bed.check_stopped_agent_protects();

    agent.unload();
    bed.check_unloaded();
    let left = created.still_in(&GuardObjects::all());
    assert!(left.is_empty(), "objects of the agent container survived unload: {left:?}");
    assert!(
        docker(&["ps", "-a", "--filter", &format!("name={CONTAINER}"), "-q"]).trim().is_empty(),
        "the agent container is still there"
    );
    assert!(
        host_state_existed || !Path::new(STATE_DIR).exists(),
        "the test agent created the host's {STATE_DIR}"
    );
}

/// `docker restart` of the agent container leaks nothing: outside host A connects about 20
/// times a second to closed ports (by container address and by published port) and to an
/// exposed one, before, during and after the restart; not one handshake to a closed port
/// completes, the exposed port keeps answering, and the new agent adopts the pinned links
/// (same link and map ids, new program ids) instead of attaching afresh.
#[test]
fn restarting_the_agent_container_leaks_nothing() {
    let image = build_image();
    check_image(image);
    let bed = SeedBed::new();
    let agent = ContainerAgent::start(&bed.uplinks());
    check_privileges(&agent);
    check_state(&agent, &bed);
    let p = &bed.project;
    let closed = [
        ("db:5432 direct", SocketAddr::new(p.db.ip().into(), 5432)),
        ("db:5432 published", SocketAddr::new(bed.a.host_v4().into(), 5432)),
        ("web:8443 published", SocketAddr::new(bed.a.host_v4().into(), 18443)),
        ("api:8080 direct v6", SocketAddr::new(p.api.ip6().into(), 8080)),
    ];
    // Opened by label; reached by address where the engine routes to containers (20.10),
    // through the published port where it drops direct routing (28).
    let exposed = if Engine::current().drops_direct_routing() {
        ("web:443 published", SocketAddr::new(bed.a.host_v4().into(), 10443))
    } else {
        ("web:443 direct", SocketAddr::new(p.web.ip().into(), 443))
    };
    let targets: Vec<SocketAddr> = closed.iter().map(|(_, a)| *a).chain([exposed.1]).collect();

    let links_before = observe::pinned_links(agent.pin_dir());
    let maps_before = observe::pinned_maps(agent.pin_dir());
    let prober = Prober::start(
        bed.a.netns().path(),
        &targets,
        20,
        Duration::from_millis(1500),
        Duration::from_secs(120),
    );
    thread::sleep(Duration::from_secs(2));
    let restart_at = prober.elapsed();
    let (took, log) = agent.restart();
    let synced_at = prober.elapsed();
    println!("docker restart {CONTAINER}: synced again after {took:.2?}");
    thread::sleep(Duration::from_secs(2));
    let report = prober.finish();

    let mut leaks = Vec::new();
    for (i, (what, addr)) in closed.iter().enumerate() {
        for (phase, from, to) in [
            ("before", Duration::ZERO, restart_at),
            ("during restart", restart_at, synced_at),
            ("after", synced_at, Duration::MAX),
        ] {
            let attempts = report.window(i, from, to);
            println!("closed {what:<20} {addr:<22} {phase:<15} {}", summarize(&attempts));
            assert!(!attempts.is_empty() || phase != "before", "no probes {phase}");
        }
        let established = report.established(i);
        if let Some(first) = established.first() {
            leaks.push(format!(
                "{what} {addr}: {} handshakes, first at {:?}",
                established.len(),
                first.sent
            ));
        }
    }
    let e = closed.len();
    for (phase, from, to) in [
        ("before", Duration::ZERO, restart_at),
        ("during restart", restart_at, synced_at),
        ("after", synced_at, Duration::MAX),
    ] {
        let attempts = report.window(e, from, to);
        println!(
            "exposed {:<19} {:<22} {phase:<15} {}",
            exposed.0,
            exposed.1,
            summarize(&attempts)
        );
        let answered =
            attempts.iter().filter(|a| matches!(a.outcome, Outcome::Established(_))).count();
        assert!(
            answered == attempts.len(),
            "the exposed {} did not always answer {phase} the restart: {}",
            exposed.0,
            summarize(&attempts)
        );
    }
    assert!(report.rate(0) >= 15.0, "probing too slow to mean anything: {:.1}/s", report.rate(0));
    assert!(
        leaks.is_empty(),
        "closed ports reached around `docker restart`:\n{}",
        leaks.join("\n")
    );

    // The new run took over the pinned links rather than attaching again.
    for uplink in bed.uplinks() {
        let adopted = log.lines().any(|l| {
            l.contains("hook=\"xdp\"")
                && l.contains(&format!("iface={uplink}"))
                && l.contains("adopted=true")
        });
        assert!(adopted, "the restarted agent did not adopt the XDP link of {uplink}:\n{log}");
    }
    let links_after = observe::pinned_links(agent.pin_dir());
    assert_eq!(
        links_before.keys().collect::<Vec<_>>(),
        links_after.keys().collect::<Vec<_>>(),
        "the pinned links changed"
    );
    for (name, before) in &links_before {
        let after = links_after[name];
        assert_eq!(before.link, after.link, "link {name} was replaced, not adopted");
        assert_ne!(before.prog, after.prog, "link {name} still runs the old program");
    }
    assert_eq!(maps_before, observe::pinned_maps(agent.pin_dir()), "the maps were recreated");
    // The state is still there for the next start, kept by the bind across the restart.
    check_state(&agent, &bed);

    bed.check_outside(true);
    let started = Instant::now();
    agent.unload();
    println!("stop and unload: {:.2?}", started.elapsed());
    bed.check_no_xdp();
}
