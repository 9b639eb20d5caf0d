//! The end of a long-running command: SIGTERM (Kubernetes stopping the pod)
//! or SIGINT (a terminal).

use std::future::Future;

/// Resolves when SIGTERM or SIGINT arrives. The handler is installed before
/// anything runs, so a server that could not be stopped cleanly never
/// starts. Needs a running Tokio runtime.
pub fn shutdown() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
}
