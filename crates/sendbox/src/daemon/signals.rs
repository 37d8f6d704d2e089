//! The signals the daemon answers: SIGTERM/SIGINT (stop, draining) and
//! SIGHUP (reload).

/// SIGINT and SIGTERM as one stream.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// The next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP, the conventional "reload your config".
pub struct Hangup {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Hangup {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Hangup {
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        self.hup.recv().await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}
