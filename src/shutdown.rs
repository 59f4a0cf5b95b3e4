//! Process lifecycle: one cancellation token for "stop intake", a task tracker to wait for
//! in-flight work, and the Unix signals that drive them (SIGTERM/SIGINT stop, SIGHUP reload).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop,
    Reload,
}

/// Forwards SIGTERM/SIGINT as `Stop` and SIGHUP as `Reload`.
pub fn listen() -> std::io::Result<mpsc::Receiver<Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
            if tx.send(sig).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
