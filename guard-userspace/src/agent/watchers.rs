//! The tasks that wake the loop (Docker's events, interface changes, pins removed) and the
//! one that renews the event budgets.

use tokio::io::{Interest, unix::AsyncFd};

use crate::telemetry::events::monotonic_ns;
use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::Notify;
use tracing::warn;

use crate::{
    host::docker::DockerClient, host::docker_link::DOCKER_POLL, kernel::maps::PolicyMaps,
    kernel::pins::Pins,
};

/// Wakes the reconciler on every container or network event; reconnects every
/// [`DOCKER_POLL`] while Docker is away and says so (`docker_back`) when the stream is up
/// again, so the reconciler resyncs at once.
pub(super) async fn follow_docker_events(wake: Arc<Notify>, docker_back: Arc<Notify>) {
    loop {
        // The reconcile loop reports an unreachable Docker; this only retries.
        if let Ok(client) = DockerClient::connect().await {
            docker_back.notify_one();
            let mut events = Box::pin(client.events());
            while let Some(event) = events.next().await {
                match event {
                    Ok(()) => wake.notify_one(),
                    Err(e) => {
                        warn!("Docker event stream: {e}");
                        break;
                    }
                }
            }
            // The stream ended: the daemon restarted or went away.
            wake.notify_one();
        }
        tokio::time::sleep(DOCKER_POLL).await;
    }
}

/// How often the pins are looked at between passes: removing them (`guard unload --force`)
/// detaches every link, so the agent restores them within this.
const PIN_CHECK: Duration = Duration::from_millis(500);

/// Wakes the reconciler when the pin directory's maps are gone (see [`Agent::restore_pins`]).
/// A stat of one pin: the whole directory goes at once.
pub(super) async fn watch_pins(pins: Pins, wake: Arc<Notify>) {
    let probe = pins.map(guard_common::maps::ADDRS);
    loop {
        tokio::time::sleep(PIN_CHECK).await;
        if !probe.exists() {
            wake.notify_one();
        }
    }
}

/// Wakes the reconciler when interfaces or addresses change (a new uplink is protected, an
/// address added later counts for published ports, within a moment rather than a resync).
pub(super) async fn follow_interface_changes(
    socket: std::io::Result<std::os::fd::OwnedFd>,
    wake: Arc<Notify>,
) {
    let socket = match socket {
        Ok(socket) => socket,
        Err(e) => {
            return warn!("cannot follow interface changes ({e}); relying on the periodic resync");
        }
    };
    // SAFETY: the OwnedFd is owned by the AsyncFd for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            return warn!("cannot follow interface changes ({e}); relying on the periodic resync");
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut ready) = fd.readable_mut().await else { return };
        // Drain everything queued, then wake once.
        loop {
            let raw = std::os::fd::AsRawFd::as_raw_fd(ready.get_inner());
            match nix::sys::socket::recv(raw, &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(_) => continue,
                // ENOBUFS: messages were lost; a resync sees everything anyway.
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => break,
            }
        }
        ready.clear_ready();
        wake.notify_one();
    }
}

/// Ends spent event budgets (drops' and accesses') each second (see
/// [`PolicyMaps::renew_event_budget`]).
pub(super) async fn renew_event_budgets(pins: Pins) {
    let mut maps = match PolicyMaps::from_pins(&pins) {
        Ok(maps) => maps,
        Err(e) => return warn!("{e}; after a flood, drop and access events may resume late"),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let _ = maps.renew_event_budget(monotonic_ns(), false);
    }
}
