//! The realtime sessions open now, so that the drain can wait for them.
//!
//! Once a client's connection is upgraded, hyper hands the socket over and stops tracking it:
//! the listener's graceful shutdown no longer sees it. Each session therefore holds a
//! [`Session`] guard, and the drain waits for [`Sessions::all_closed`] within the grace
//! period, after every session has been told to close ([`crate::App::drain_begun`]).

use tokio::sync::watch;

/// Realtime sessions open now.
#[derive(Debug, Clone)]
pub struct Sessions {
    open: watch::Sender<usize>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            open: watch::Sender::new(0),
        }
    }
}

impl Sessions {
    /// Counts a session as open until the guard drops.
    pub fn open(&self) -> Session {
        self.open.send_modify(|open| *open += 1);
        Session {
            open: self.open.clone(),
        }
    }

    /// Sessions open now.
    pub fn count(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once no session is open.
    pub async fn all_closed(&self) {
        let mut open = self.open.subscribe();
        // The sender lives in `self`: the channel cannot close while this waits.
        let _ = open.wait_for(|open| *open == 0).await;
    }
}

/// One open session.
#[derive(Debug)]
pub struct Session {
    open: watch::Sender<usize>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.open.send_modify(|open| *open = open.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn all_closed_waits_for_the_last_session() {
        let sessions = Sessions::default();
        sessions.all_closed().await;
        let first = sessions.open();
        let second = sessions.open();
        assert_eq!(sessions.count(), 2);
        let waiter = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.all_closed().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("closed in time")
            .expect("joined");
    }
}
