//! How xtask starts a daemon (dockerd 20.10 and 28, `podman system service`, the VM's
//! containerd): one place, so that every one of them is detached the same way.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` start a daemon: in a session of its own, so that Ctrl-C on xtask (or on what
/// it runs) does not reach it, and with every descriptor above stderr closed at exec.
///
/// xtask inherits descriptors without close-on-exec from whoever started it, and a daemon
/// would hold them for as long as it runs: started from `flock FILE cargo xtask test`,
/// dockerd kept the lock's fd 3, and with it the lock, after the run had ended. The tests'
/// own dockerd restart (tests/src/dockerd.rs) does the same.
pub fn detached(cmd: &mut Command) -> &mut Command {
    // SAFETY: setsid, close_range and fcntl are async-signal-safe and the closure allocates
    // nothing, as code between fork and exec must. Close-on-exec rather than close: std's
    // pipe that reports a failed exec to the parent is among the descriptors.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            let all_cloexec =
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if all_cloexec == -1 {
                // Before Linux 5.11: one by one.
                for fd in 3..65_536 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a shell started by `cmd` finds descriptor `fd` open.
    fn child_holds(cmd: &mut Command, fd: i32) -> bool {
        cmd.args(["-c", &format!("test -e /proc/self/fd/{fd}")]).status().expect("run sh").success()
    }

    #[test]
    fn a_daemon_holds_no_descriptor_of_its_starter() {
        // Inheritable, as the lock `flock FILE cargo xtask test` hands down: dup sets no
        // close-on-exec.
        // SAFETY: dup of stderr, closed below; no other code owns the new descriptor.
        let fd = unsafe { libc::dup(libc::STDERR_FILENO) };
        assert!(fd > 2, "dup: {}", io::Error::last_os_error());
        let plain = child_holds(&mut Command::new("sh"), fd);
        let daemon = child_holds(detached(&mut Command::new("sh")), fd);
        // SAFETY: closes the descriptor dup gave this test.
        unsafe { libc::close(fd) };
        assert!(plain, "a plain child inherits fd {fd}: the check would prove nothing");
        assert!(!daemon, "a daemon started by xtask inherited fd {fd}");
    }
}
