//! Connection attempts at a steady rate, from inside a namespace, for as long as a fault
//! scenario lasts: every attempt's outcome is recorded with its time, so a test can say "not
//! one connection to the closed port got through, before, during or after the fault".
//!
//! Each attempt is a non-blocking `connect()` (one SYN, and its retransmission if the socket
//! is still waiting a second later) kept open for a fixed patience and watched with `poll()`.
//! That decouples the rate from the outcome: a dropped SYN costs no waiting, so one thread
//! keeps thousands of attempts per second in flight, and a handshake that completes late is
//! still seen.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockopt, socket, sockopt,
};

use crate::netns::in_netns;

/// What became of one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake completed, after this long.
    Established(Duration),
    /// A RST came back: the packet reached a stack that has no listener there.
    Refused,
    /// Nothing came back within the patience: dropped on the way.
    NoAnswer,
    /// Any other error (an ICMP unreachable, no free local port, ...).
    Failed(Errno),
}

/// One attempt: which target, when it was sent (since the prober started) and its outcome.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub target: usize,
    pub sent: Duration,
    pub outcome: Outcome,
}

/// A running prober; [`Prober::finish`] stops it and returns what it saw.
pub struct Prober {
    origin: Instant,
    targets: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Attempt>>>,
}

/// How long `poll()` waits per round: the resolution of the rate and of the latencies.
const ROUND: Duration = Duration::from_millis(1);

impl Prober {
    /// Starts `rate` attempts per second to each of `targets` from the network namespace at
    /// `netns`, each kept open for `patience`, for at most `limit` (a bound in case the test
    /// never calls [`Prober::finish`]).
    pub fn start(
        netns: PathBuf,
        targets: &[SocketAddr],
        rate: u32,
        patience: Duration,
        limit: Duration,
    ) -> Self {
        assert!(rate > 0 && !targets.is_empty(), "a prober needs targets and a rate");
        raise_fd_limit(rate as usize * targets.len() * (patience.as_secs() as usize + 2));
        let stop = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        let thread = {
            let (stop, targets) = (stop.clone(), targets.to_vec());
            thread::spawn(move || {
                in_netns(&netns, || run(&targets, rate, patience, limit, origin, &stop))
            })
        };
        Self { origin, targets: targets.to_vec(), stop, thread: Some(thread) }
    }

    /// Time since the prober started: the clock of [`Attempt::sent`].
    pub fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Stops sending, waits for the attempts in flight to resolve (at most the patience) and
    /// returns every attempt.
    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        let attempts = self.thread.take().expect("running").join().expect("prober panicked");
        ProbeReport { targets: self.targets.clone(), attempts }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Pending {
    fd: OwnedFd,
    target: usize,
    sent: Instant,
}

fn run(
    targets: &[SocketAddr],
    rate: u32,
    patience: Duration,
    limit: Duration,
    origin: Instant,
    stop: &AtomicBool,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut sent = vec![0u64; targets.len()];
    let record = |attempts: &mut Vec<Attempt>, target, at: Instant, outcome| {
        attempts.push(Attempt { target, sent: at.duration_since(origin), outcome });
    };
    loop {
        let sending = !stop.load(Ordering::Relaxed) && origin.elapsed() < limit;
        if !sending && pending.is_empty() {
            break;
        }
        if sending {
            // Catch up to the schedule: a slow round sends a burst, the average rate holds.
            let due = (origin.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1;
            for (target, addr) in targets.iter().enumerate() {
                while sent[target] < due {
                    sent[target] += 1;
                    let now = Instant::now();
                    match launch(*addr) {
                        Ok(Some(fd)) => pending.push(Pending { fd, target, sent: now }),
                        Ok(None) => {
                            record(
                                &mut attempts,
                                target,
                                now,
                                Outcome::Established(Duration::ZERO),
                            );
                        }
                        Err(Errno::ECONNREFUSED) => {
                            record(&mut attempts, target, now, Outcome::Refused);
                        }
                        Err(e) => record(&mut attempts, target, now, Outcome::Failed(e)),
                    }
                }
            }
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|p| libc::pollfd { fd: p.fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let ready = unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ROUND.as_millis() as i32)
        };
        if pending.is_empty() {
            thread::sleep(ROUND);
        }
        let now = Instant::now();
        let mut still = Vec::with_capacity(pending.len());
        for (p, pfd) in pending.into_iter().zip(&fds) {
            if ready > 0 && pfd.revents != 0 {
                let outcome = match getsockopt(&p.fd, sockopt::SocketError) {
                    Ok(0) => Outcome::Established(now.duration_since(p.sent)),
                    Ok(e) if e == libc::ECONNREFUSED => Outcome::Refused,
                    Ok(e) => Outcome::Failed(Errno::from_raw(e)),
                    Err(e) => Outcome::Failed(e),
                };
                record(&mut attempts, p.target, p.sent, outcome);
            } else if now.duration_since(p.sent) >= patience {
                record(&mut attempts, p.target, p.sent, Outcome::NoAnswer);
            } else {
                still.push(p);
            }
        }
        pending = still;
    }
    attempts.sort_by_key(|a| a.sent);
    attempts
}

/// A non-blocking connect to `addr`: the socket while the handshake is under way, `None` if
/// it completed at once.
fn launch(addr: SocketAddr) -> Result<Option<OwnedFd>, Errno> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket(family, SockType::Stream, flags, None)?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => Ok(None),
        Err(Errno::EINPROGRESS) => Ok(Some(fd)),
        Err(e) => Err(e),
    }
}

/// Makes room for `needed` more open descriptors (the soft limit is often 1024).
fn raise_fd_limit(needed: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return;
        }
        let wanted = (needed as libc::rlim_t + 1024).min(limit.rlim_max);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}

/// Every attempt of a finished prober.
pub struct ProbeReport {
    pub targets: Vec<SocketAddr>,
    pub attempts: Vec<Attempt>,
}

impl ProbeReport {
    /// The attempts to target `target` sent in `[from, to)` (prober time).
    pub fn window(&self, target: usize, from: Duration, to: Duration) -> Vec<Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.target == target && a.sent >= from && a.sent < to)
            .copied()
            .collect()
    }

    /// The attempts to `target` that completed a handshake.
    pub fn established(&self, target: usize) -> Vec<Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.target == target && matches!(a.outcome, Outcome::Established(_)))
            .copied()
            .collect()
    }

    /// Attempts per second to `target` over the span it was probed.
    pub fn rate(&self, target: usize) -> f64 {
        let sent: Vec<Duration> =
            self.attempts.iter().filter(|a| a.target == target).map(|a| a.sent).collect();
        match (sent.first(), sent.last()) {
            (Some(first), Some(last)) if last > first => {
                (sent.len() - 1) as f64 / (*last).checked_sub(*first).unwrap().as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// "N attempts: a established (max latency), r refused, n no answer, f failed (errors)".
pub fn summarize(attempts: &[Attempt]) -> String {
    let (mut established, mut refused, mut silent) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    let mut failed = Vec::new();
    for a in attempts {
        match a.outcome {
            Outcome::Established(latency) => {
                established += 1;
                slowest = slowest.max(latency);
            }
            Outcome::Refused => refused += 1,
            Outcome::NoAnswer => silent += 1,
            Outcome::Failed(e) => failed.push(e),
        }
    }
    let mut line = format!(
        "{} attempts: {established} established (slowest {slowest:.1?}), {refused} refused, \
         {silent} no answer, {} failed",
        attempts.len(),
        failed.len()
    );
    failed.sort_by_key(|e| *e as i32);
    failed.dedup();
    if !failed.is_empty() {
        line.push_str(&format!(" {failed:?}"));
    }
    line
}
