//! A running dockerd, and the busybox test image (no registry is reachable).

use std::fs::{self, File};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::daemon::detached;
use crate::{capture, sh, succeeds_within};

/// The image the tests run their containers from (exported as GUARD_TEST_IMAGE).
pub const TEST_IMAGE: &str = "guard-test:busybox";

const INFO_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The docker client: Debian's (same version as its dockerd) when installed.
pub fn docker() -> Command {
    if Path::new("/usr/bin/docker").exists() {
        Command::new("/usr/bin/docker")
    } else {
        Command::new("docker")
    }
}

fn daemon_answers() -> bool {
    succeeds_within(docker().arg("info"), INFO_TIMEOUT)
}

/// Start dockerd in its own session unless one answers; its log goes to `<target>/dockerd.log`.
pub fn ensure_daemon(target_dir: &Path) -> Result<()> {
    ensure_daemon_within(target_dir, START_TIMEOUT)
}

/// [`ensure_daemon`], waiting up to `timeout` for a started dockerd to answer (an emulated
/// CPU needs longer).
pub fn ensure_daemon_within(target_dir: &Path, timeout: Duration) -> Result<()> {
    if daemon_answers() {
        println!("xtask: dockerd answers");
        return Ok(());
    }
    let log_path = target_dir.join("dockerd.log");
    println!("xtask: starting dockerd in the background (log: {}) ...", log_path.display());
    fs::create_dir_all(target_dir)?;
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("dockerd");
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Detached: Ctrl-C on xtask or guard must not reach it.
    let mut child = detached(&mut cmd).spawn().context("starting dockerd")?;
    let deadline = Instant::now() + timeout;
    loop {
        if daemon_answers() {
            println!("xtask: dockerd is up");
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return fail_with_log(&log_path, &format!("dockerd exited ({status})"));
        }
        if Instant::now() >= deadline {
            let what =
                format!("dockerd did not answer `docker info` within {} s", timeout.as_secs());
            return fail_with_log(&log_path, &what);
        }
        sleep(Duration::from_millis(500));
    }
}

fn fail_with_log(log_path: &Path, what: &str) -> Result<()> {
    let log = fs::read_to_string(log_path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    eprintln!("xtask: last 30 lines of {}:", log_path.display());
    for line in &lines[lines.len().saturating_sub(30)..] {
        eprintln!("  {line}");
    }
    bail!("{what}")
}

/// Build `guard-test:busybox` from Debian's busybox-static unless it exists.
pub fn ensure_test_image() -> Result<()> {
    if succeeds_within(docker().args(["image", "inspect", TEST_IMAGE]), INFO_TIMEOUT) {
        println!("xtask: test image {TEST_IMAGE} present");
        return Ok(());
    }
    println!("xtask: building test image {TEST_IMAGE} from /bin/busybox with docker import ...");
    let dir = std::env::temp_dir().join(format!("guard-test-image.{}", std::process::id()));
    let root = dir.join("root");
    let result = populate(&root).and_then(|()| import(&root));
    let _ = fs::remove_dir_all(&dir);
    result
}

/// root/bin/busybox and a symlink per applet, /tmp, /etc/passwd, /www/index.html.
fn populate(root: &Path) -> Result<()> {
    let bin = root.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy("/bin/busybox", bin.join("busybox")).context("copying /bin/busybox")?;
    let applets = capture(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets.lines().map(str::trim) {
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", bin.join(applet))?;
        }
    }
    let tmp = root.join("tmp");
    fs::create_dir(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    write(
        root,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    write(root, "etc/group", "root:x:0:\nnogroup:x:65534:\n")?;
    write(root, "www/index.html", "ok\n")
}

fn write(root: &Path, path: &str, contents: &str) -> Result<()> {
    let path: PathBuf = root.join(path);
    fs::create_dir_all(path.parent().context("no parent")?)?;
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

/// `tar -C root -c . | docker import -c 'ENV PATH=/bin' - guard-test:busybox`
fn import(root: &Path) -> Result<()> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let tar_out = tar.stdout.take().context("tar has no stdout")?;
    let mut import = docker();
    import.args(["import", "-c", "ENV PATH=/bin", "-", TEST_IMAGE]).stdin(tar_out);
    let imported = sh(&mut import);
    let tar_status = tar.wait()?;
    imported?;
    if !tar_status.success() {
        bail!("tar -C {} -c . failed ({tar_status})", root.display());
    }
    Ok(())
}
