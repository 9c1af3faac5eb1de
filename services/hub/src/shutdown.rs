//! Process signals that start a graceful shutdown.
//!
//! The signal only starts the drain; [`Server::run`](crate::server::Server::run) then turns
//! readiness off, closes every connection with 1012 (service restart) through the live-token
//! registry every connection is in (`LiveTokens::close_all`), and returns when they are gone or the drain timeout has passed.

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
