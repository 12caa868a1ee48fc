//! The agent's reader of the kernel's event ring: each event becomes a drop or an access
//! record by its reason's verdict, is logged (summarised per source: [`super::summary`]),
//! and kept for the HTTP endpoint.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use guard_common::{
    events::PacketEvent,
    reason::{Reason, Verdict},
};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use super::{
    Clock,
    access::AccessRecord,
    drops::DropRecord,
    summary::{self, Summariser},
};
use crate::{telemetry::http::Shared, telemetry::metrics::AgentState};

/// How long events wait for the first sync to name what they hit.
const EVENTS_WAIT_FOR_SYNC: Duration = Duration::from_secs(10);

/// How often summaries of windows that ended are logged when no event comes to tell them: a
/// source that went quiet is summarised at most this late.
const SUMMARY_FLUSH: Duration = Duration::from_secs(1);

/// What an event is to the operator.
#[derive(Debug, PartialEq)]
pub enum Told {
    Drop(DropRecord),
    Access(AccessRecord),
}

/// An event named with what the agent knows now. A pass is an access (an opening let a new
/// flow in); anything else is a drop, audited or not, and so is a reason this agent does not
/// know (a newer program's), as before there were accesses.
pub fn tell(event: &PacketEvent, state: &AgentState, clock: &Clock) -> Told {
    let reason = Reason::from_u32(u32::from(event.reason));
    match reason.map(Reason::verdict) {
        Some(Verdict::Pass) => Told::Access(AccessRecord::from_event(
            event,
            &state.names,
            &state.ifaces,
            &state.openings,
            clock,
        )),
        _ => Told::Drop(DropRecord::from_event(event, &state.names, &state.ifaces, clock)),
    }
}

/// Reads events off the kernel's ring buffer until it fails: each becomes a log line naming
/// the container and port, and a record for `/drops` or `/access`.
pub async fn consume(ring: RingBuf<MapData>, shared: Arc<Shared>) {
    let clock = Clock::new();
    // Events that queued while no agent ran (the ring keeps them) are told once the first
    // sync has named the containers and interfaces, not as anonymous targets; a Docker that
    // does not answer holds them back for a few seconds only.
    let deadline = Instant::now() + EVENTS_WAIT_FOR_SYNC;
    while !shared.state.lock().expect("not poisoned").synced && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            return warn!("cannot watch the event ring: {e}; drops and accesses are still counted");
        }
    };
    let (mut drops, mut access) = (Summariser::new(), Summariser::new());
    let mut flush = tokio::time::interval(SUMMARY_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut ready = tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(ready) => ready,
                Err(e) => return warn!("event ring: {e}; drops and accesses are still counted"),
            },
            _ = flush.tick() => {
                summary::log(drops.flush(Instant::now()));
                summary::log(access.flush(Instant::now()));
                continue;
            }
        };
        let ring = ready.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<PacketEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole PacketEvent; read_unaligned needs no alignment.
            let event: PacketEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let told = tell(&event, &shared.state.lock().expect("not poisoned"), &clock);
            // Every record is kept; the log has the first of each source's window in full
            // and the rest as one summary.
            match told {
                Told::Drop(record) => {
                    summary::log(drops.event(&record, Instant::now()));
                    shared.drops.push(record);
                }
                Told::Access(record) => {
                    summary::log(access.event(&record, Instant::now()));
                    shared.access.push(record);
                }
            }
        }
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use guard_common::events::{DROP_AUDITED, DROP_PUBLISHED};

    use super::*;
    use crate::telemetry::events::tests::event;

    #[test]
    fn passes_are_accesses_and_everything_else_drops() {
        let state = AgentState::default();
        let clock = Clock::new();
        for reason in [Reason::Exposed, Reason::AllowedSource] {
            let told = tell(&event(reason, DROP_PUBLISHED), &state, &clock);
            assert!(matches!(told, Told::Access(ref a) if a.reason == reason.name()), "{told:?}");
        }
        for (reason, flags) in [
            (Reason::Closed, 0),
            (Reason::Closed, DROP_AUDITED),
            (Reason::RateLimited, DROP_PUBLISHED),
            (Reason::Denied, 0),
        ] {
            let told = tell(&event(reason, flags), &state, &clock);
            assert!(matches!(told, Told::Drop(ref d) if d.reason == reason.name()), "{told:?}");
        }
        let unknown = PacketEvent { reason: 200, ..event(Reason::Closed, 0) };
        assert!(
            matches!(tell(&unknown, &state, &clock), Told::Drop(ref d) if d.reason == "unknown")
        );
    }
}
