//! The loop: a pass against Docker when it answers (with backoff after failures), a pass on
//! what the agent last knew while it does not, and the signals that stop or reload.

use crate::telemetry::events::monotonic_ns;
use std::{
    fs,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{host::docker_link::DockerLink, kernel::pins::Pins};

use super::{start::Started, sync::SyncError};

/// How often the swarm's membership is asked while the node is in one.
const SWARM_POLL: Duration = Duration::from_secs(1);

/// Longest wait between attempts to reconcile after failures.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(8);

pub(super) async fn supervise(started: Started) -> anyhow::Result<()> {
    let Started { mut agent, wake, docker_back, mut crowdsec_changes } = started;
    let shared = agent.shared.clone();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut docker = DockerLink::default();
    // While Docker cannot be asked, a pass applies what the agent last knew (closed until it
    // has synced): it runs at start and whenever interfaces change, so uplinks and Docker's
    // bridges (which dockerd creates before its API answers) are guarded at once.
    let mut offline_pass_due = true;
    let mut announced = false;
    // And every resync interval, as when Docker answers: an interface change the netlink
    // socket lost (ENOBUFS) is seen then.
    let mut last_offline_pass = Instant::now();
    // Failed reconciles back off; wake-ups in between (a burst of events as a daemon stops) do
    // not count as attempts, so they cannot inflate the delay.
    let mut backoff = Backoff::default();
    loop {
        *shared.heartbeat.lock().expect("not poisoned") = Instant::now();
        docker.try_connect();
        match &docker.client {
            Some(client) if backoff.due() => {
                let started = Instant::now();
                let result = agent.reconcile(client).await;
                let docker_answered = !matches!(result, Err(SyncError::Docker(_)));
                let took = result.is_ok().then(|| started.elapsed());
                shared.state.lock().expect("not poisoned").record_pass(took, docker_answered);
                match result {
                    Ok(()) => {
                        backoff.succeeded();
                        if agent.changed || !agent.synced {
                            shared.exposures.after_sync();
                        }
                        if !agent.synced {
                            agent.synced = true;
                            tell_systemd_ready();
                            info!(pin_dir = %agent.opts.pins.root().display(), "initial sync complete");
                            agent.summarise();
                            // Every link runs this build's program (and maps) now: maps of
                            // another layout, left by an agent of another version, serve
                            // nothing.
                            drop_other_layouts(&agent.opts.pins);
                        }
                    }
                    Err(e) => {
                        let delay = backoff.failed();
                        let docker_lost = matches!(e, SyncError::Docker(_));
                        // anyhow prints the causes after the error, as this line always has.
                        let e = anyhow::Error::new(e);
                        warn!(
                            "reconcile failed: {e:#}; retrying in {delay:?}, protection unchanged"
                        );
                        if docker_lost {
                            docker.lost();
                            offline_pass_due = true;
                        }
                    }
                }
            }
            Some(_) => {}
            // Adopted maps keep protecting as they are while the first answer from Docker is
            // awaited: a healthy daemon answers within milliseconds, and closing first would
            // interrupt every exposed service on each restart of the agent.
            None if (offline_pass_due || last_offline_pass.elapsed() >= agent.opts.resync)
                && (docker.heard_back || !agent.adopted) =>
            {
                offline_pass_due = false;
                last_offline_pass = Instant::now();
                match agent.apply_known() {
                    Ok(()) if !agent.synced && !announced => {
                        announced = true;
                        info!(
                            "guarding before Docker answers: nothing is opened until the agent has synced"
                        );
                        tell_systemd_ready();
                    }
                    Ok(()) => {}
                    Err(e) => warn!(
                        "applying the last known state failed: {e:#}; retrying on the next change"
                    ),
                }
            }
            None => {}
        }
        // In a swarm, membership is asked every second: a node that joins is admitted to the
        // overlay within a second of the engine knowing it (workers get no event for it).
        let resync = if agent.known.doors.swarm.is_some() {
            agent.opts.resync.min(SWARM_POLL)
        } else {
            agent.opts.resync
        };
        let wait = match docker.client {
            None => docker.until_next_attempt(),
            Some(_) => backoff.remaining().unwrap_or(resync),
        };
        // A ban ends on time: the pass after it lifts it.
        let until_ban_ends = agent.deny.next_expiry.map(|at| {
            Duration::from_secs(at.saturating_sub(crate::cli::bans::now()))
                + Duration::from_millis(50)
        });
        let wait = until_ban_ends.map_or(wait, |until| wait.min(until));
        tokio::select! {
            ended = docker.attempt_ended() => docker.settle(ended, agent.synced),
            () = wake.notified() => offline_pass_due = true,
            // CrowdSec added or deleted a ban: a pass puts it in force.
            () = decisions_changed(&mut crowdsec_changes) => offline_pass_due = true,
            // The event stream reached Docker again: try at once, whatever the backoff says.
            () = docker_back.notified() => backoff.succeeded(),
            () = tokio::time::sleep(wait) => {}
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the policy file");
                offline_pass_due = true;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let _ = agent.maps.renew_event_budget(monotonic_ns(), true);
    info!("stopping; the pinned program and maps keep protecting (`guard unload` removes them)");
    Ok(())
}

/// When the followed decisions change; never without a follower (or once it has stopped).
async fn decisions_changed(
    follower: &mut Option<tokio::sync::watch::Receiver<crate::host::crowdsec::Bans>>,
) {
    if let Some(decisions) = follower
        && decisions.changed().await.is_ok()
    {
        return;
    }
    *follower = None;
    std::future::pending::<()>().await;
}

/// Tells systemd (`Type=notify`) that the agent guards: the maps hold what it knows and the
/// programs are attached, so docker.service, ordered after it, starts only now. Nothing when
/// not run by systemd; a second call is harmless.
fn tell_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(e) => return warn!("telling systemd the agent is ready: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // A leading '@' names an abstract socket.
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(b"READY=1", &addr)),
        None => socket.send_to(b"READY=1", &path),
    };
    if let Err(e) = sent {
        warn!("telling systemd the agent is ready ({}): {e}", path.to_string_lossy());
    }
}

fn drop_other_layouts(pins: &Pins) {
    for dir in pins.other_layouts() {
        let removed = fs::read_dir(&dir).map_or(0, |entries| {
            entries.flatten().filter(|e| fs::remove_file(e.path()).is_ok()).count()
        });
        let _ = fs::remove_dir(&dir);
        info!(dir = %dir.display(), maps = removed, "removed the maps of an older layout");
    }
}

/// When the next reconcile may be tried after failures: 1 s, doubling up to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    fn due(&self) -> bool {
        self.next.is_none_or(|next| Instant::now() >= next)
    }

    /// Records a failed attempt; the delay until the next one.
    fn failed(&mut self) -> Duration {
        let delay = (Duration::from_secs(1) * 2u32.saturating_pow(self.failures)).min(MAX_BACKOFF);
        self.failures += 1;
        self.next = Some(Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// Time left before the next attempt, if one is pending.
    fn remaining(&self) -> Option<Duration> {
        self.next.map(|next| next.saturating_duration_since(Instant::now()))
    }
}
