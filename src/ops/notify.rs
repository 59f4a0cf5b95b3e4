//! systemd notifications (Type=notify): READY, STOPPING, RELOADING and the watchdog.
//! A no-op when not started by systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    // Abstract sockets ("@name") are not supported here; systemd uses a path by default.
    if path.to_string_lossy().starts_with('@') {
        tracing::debug!("abstract NOTIFY_SOCKET not supported");
        return;
    }
    let result = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|sock| sock.send_to(state.as_bytes(), &path));
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down");
}

pub fn reloading() {
    send("RELOADING=1");
}

/// Pings the watchdog at half its interval until `stop`, if systemd asked for one.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => send("WATCHDOG=1"),
            }
        }
    });
}
