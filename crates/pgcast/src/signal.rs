//! Shutdown on SIGINT (Ctrl-C) or SIGTERM.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token that is cancelled when the process receives SIGINT or SIGTERM. A second signal
/// ends the process at once (exit status 1), as an impatient operator expects: the handlers
/// replace the signals' default action for the life of the process.
///
/// The handlers are installed before this returns, so a signal that arrives at any later
/// moment is seen. Must be called inside a tokio runtime.
pub fn cancel_on_signal() -> std::io::Result<CancellationToken> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received; stopping"),
            _ = terminate.recv() => tracing::info!("SIGTERM received; stopping"),
        }
        cancel.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::warn!("second signal received; exiting without waiting");
        std::process::exit(1);
    });
    Ok(token)
}
