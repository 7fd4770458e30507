//! Process signals as operator intents.
//!
//! Service managers stop a process with SIGTERM (systemd, Kubernetes, Docker) and a terminal
//! with SIGINT (Ctrl-C); both mean "drain and exit". SIGHUP conventionally means "re-read
//! your configuration" (nginx, HAProxy). [`Signals`] installs all three handlers at once, so
//! from the moment it exists none of them can kill the process with its default action, and
//! the serve loop sees a stream of [`Signal`]s instead of three signal kinds.
//! [`Signals::until_shutdown`] is the server's handling: reload on SIGHUP, return on the
//! first SIGTERM or SIGINT (the shutdown future given to `Server::run`).

use std::io;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::app::App;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop accepting, drain, exit.
    Shutdown,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// The installed SIGTERM, SIGINT and SIGHUP handlers.
#[derive(Debug)]
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. Must be called inside a tokio runtime.
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal. Shutdown wins when both are pending. Should the runtime's signal
    /// driver go away, this reports [`Signal::Shutdown`]: the process is ending anyway.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            biased;
            Some(()) = self.terminate.recv() => Signal::Shutdown,
            Some(()) = self.interrupt.recv() => Signal::Shutdown,
            Some(()) = self.hangup.recv() => Signal::Reload,
            else => Signal::Shutdown,
        }
    }

    /// Reloads `app`'s configuration on every SIGHUP (a refused reload is logged and the
    /// running configuration stays) and returns on the first SIGTERM or SIGINT.
    pub async fn until_shutdown(mut self, app: Arc<App>) {
        while self.recv().await == Signal::Reload {
            // Reloading reads files: off the async workers. The outcome is logged, and either
            // way the proxy keeps serving.
            let app = Arc::clone(&app);
            let _ = tokio::task::spawn_blocking(move || app.reload_logged("SIGHUP")).await;
        }
        tracing::info!("shutdown requested");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// SIGHUP to this very process: safe because the handler is installed first (its default
    /// action would end the test binary).
    #[tokio::test]
    async fn sighup_means_reload() {
        let mut signals = Signals::new().expect("install handlers");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let received = tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("SIGHUP delivered within 10 s");
        assert_eq!(received, Signal::Reload);
    }
}
