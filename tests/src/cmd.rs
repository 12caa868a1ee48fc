//! Running the external tools of the test bed (`ip`, `iptables`, `docker`, `guard`) with a
//! time limit, so a wedged daemon fails the test instead of hanging it.

use std::fmt::Display;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Generous: `docker run` on a loaded 2-core machine can take several seconds.
/// How long a command of the test bed may run (see [`crate::patience`]).
pub fn command_timeout() -> Duration {
    crate::patience(Duration::from_secs(60))
}

/// Runs `program args`, returns its stdout; panics with the command line and stderr if it
/// fails or outlives [`command_timeout`].
pub fn run(program: &str, args: &[&str]) -> String {
    match try_run(program, args) {
        Ok(stdout) => stdout,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`run`] but returns the failure as a message: for drops, which must not panic while
/// a test is already unwinding.
pub fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    try_command(Command::new(program).args(args), &format!("{program} {}", args.join(" ")))
}

/// Runs `command` (bounded by [`command_timeout`]), named `line` in messages: its stdout, or
/// the failure with stderr.
pub fn try_command(command: &mut Command, line: &str) -> Result<String, String> {
    let out = output(command, command_timeout()).map_err(|e| format!("`{line}`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
        ))
    }
}

/// `Command::output` with a deadline: the child is killed when it runs out of time.
pub fn output(command: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    // Drain both pipes while waiting, or a chatty child blocks on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_bounded(&mut child, timeout);
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(format!(
            "still running after {timeout:?}, killed; stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        )),
    }
}

/// Waits for `child` up to `timeout`; on timeout kills it and returns `None`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// The first executable named `program` on `$PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// Reports a cleanup problem or a leftover being removed. Straight to stderr, past libtest's
/// capture, which would swallow it for a test that passes: a host left changed must never
/// go unnoticed.
pub fn warn(message: impl Display) {
    let _ = writeln!(std::io::stderr(), "e2e test bed: {message}");
}
