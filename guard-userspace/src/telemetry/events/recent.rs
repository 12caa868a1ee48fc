//! The most recent records of a stream, kept for the agent's HTTP endpoint, and a channel to
//! follow new ones.

use std::{collections::VecDeque, sync::Mutex};

use tokio::sync::broadcast;

/// How many recent records each stream keeps (and `/drops`, `/access` return).
pub const RECENT: usize = 1000;

/// The most recent records (at most [`RECENT`]), and a channel to follow new ones.
pub struct Recent<T> {
    recent: Mutex<VecDeque<T>>,
    new: broadcast::Sender<T>,
}

impl<T: Clone> Recent<T> {
    pub fn new() -> Self {
        Recent {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            new: broadcast::channel(RECENT).0,
        }
    }

    pub fn push(&self, record: T) {
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record.clone());
        let _ = self.new.send(record);
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.recent.lock().expect("not poisoned").iter().cloned().collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<T> {
        self.new.subscribe()
    }
}

impl<T: Clone> Default for Recent<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_records_are_bounded_and_followable() {
        let recent = Recent::new();
        let mut follower = recent.follow();
        for i in 0..(RECENT + 10) {
            recent.push(i);
        }
        let kept = recent.snapshot();
        assert_eq!(kept.len(), RECENT);
        assert_eq!(kept[0], 10, "the oldest are forgotten first");
        let mut late = recent.follow();
        recent.push(7);
        recent.push(8);
        assert_eq!((late.try_recv().unwrap(), late.try_recv().unwrap()), (7, 8));
        assert!(follower.try_recv().is_ok(), "an early follower sees records too");
    }
}
