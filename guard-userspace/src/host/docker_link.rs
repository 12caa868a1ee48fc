//! The agent's link to Docker's API. Connecting runs beside the reconcile loop: a daemon that
//! is starting accepts connections long before it answers, and the bridges it creates
//! meanwhile must be guarded. While Docker cannot be reached it is tried every
//! [`DOCKER_POLL`], and that is said once (again after a minute), not at every attempt.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::host::docker::{DockerClient, DockerError};

/// How often Docker is tried while it cannot be reached: a failed connect to a local socket
/// costs nothing, and a dockerd that comes up is seen within this.
pub const DOCKER_POLL: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct DockerLink {
    /// A client that has answered; None while Docker cannot be reached.
    pub client: Option<DockerClient>,
    attempt: Option<JoinHandle<Result<DockerClient, DockerError>>>,
    next_attempt: Option<Instant>,
    /// Whether an attempt has ended (answered or failed) since the agent started.
    pub heard_back: bool,
    unreachable_since: Option<Instant>,
    said_at: Option<Instant>,
}

impl DockerLink {
    /// Starts an attempt if there is no client, none under way, and the last failed one is
    /// [`DOCKER_POLL`] ago.
    pub fn try_connect(&mut self) {
        let due = self.next_attempt.is_none_or(|t| Instant::now() >= t);
        if self.client.is_none() && self.attempt.is_none() && due {
            self.attempt = Some(tokio::spawn(DockerClient::connect()));
        }
    }

    /// How long the loop may sleep before the next attempt is due.
    pub fn until_next_attempt(&self) -> Duration {
        let next = self.next_attempt.unwrap_or_else(Instant::now);
        next.saturating_duration_since(Instant::now()).max(DOCKER_POLL)
    }

    /// The end of the attempt under way (pending while there is none), to be handed to
    /// [`DockerLink::settle`].
    pub async fn attempt_ended(&mut self) -> Result<DockerClient, String> {
        match self.attempt.as_mut() {
            Some(attempt) => match attempt.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(format!("connecting to Docker: {e}")),
            },
            None => std::future::pending().await,
        }
    }

    /// Takes the end of an attempt: a client, or a failure said once. `synced`: whether the
    /// agent has synced since it started, which decides what the failure means.
    pub fn settle(&mut self, ended: Result<DockerClient, String>, synced: bool) {
        self.attempt = None;
        self.heard_back = true;
        match ended {
            Ok(client) => {
                if let Some(since) = self.unreachable_since.take() {
                    info!(after = ?since.elapsed(), "Docker answers");
                }
                self.said_at = None;
                self.client = Some(client);
            }
            Err(e) => {
                let now = Instant::now();
                self.next_attempt = Some(now + DOCKER_POLL);
                self.unreachable_since.get_or_insert(now);
                if self.said_at.is_some_and(|t| now - t < Duration::from_secs(60)) {
                    return;
                }
                self.said_at = Some(now);
                if synced {
                    warn!("{e}; protection unchanged, retrying every {DOCKER_POLL:?}");
                } else {
                    warn!(
                        "{e}; every container stays closed until the agent has synced with Docker, retrying every {DOCKER_POLL:?}"
                    );
                }
            }
        }
    }

    /// The client failed: connect again.
    pub fn lost(&mut self) {
        self.client = None;
    }
}
