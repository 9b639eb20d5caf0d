//! The gateway benchmark's ceiling: the least an exact hit can cost. An HTTP
//! server that answers every request with the value of one fixed Redis key,
//! read with one GET, on the same stack as the gateway (axum, tokio, the
//! redis crate's multiplexed connection). Nothing is parsed, keyed or
//! rendered.
//!
//! `ceiling LISTEN_ADDR REDIS_URL KEY`

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

async fn answer(
    State(state): State<Arc<(redis::aio::MultiplexedConnection, String)>>,
) -> impl IntoResponse {
    let mut conn = state.0.clone();
    match redis::cmd("GET")
        .arg(&state.1)
        .query_async::<Option<Vec<u8>>>(&mut conn)
        .await
    {
        Ok(Some(v)) => (StatusCode::OK, Bytes::from(v)).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, redis_url, key] = &args[..] else {
        eprintln!("usage: ceiling LISTEN_ADDR REDIS_URL KEY");
        std::process::exit(2);
    };
    let connected = match redis::Client::open(redis_url.as_str()) {
        Ok(client) => client.get_multiplexed_async_connection().await,
        Err(e) => Err(e),
    };
    let conn = connected.unwrap_or_else(|e| {
        eprintln!("error: failed to connect to {redis_url}: {e}");
        std::process::exit(1);
    });
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::new((conn, key.clone())));
    let listener = tokio::net::TcpListener::bind(listen.as_str())
        .await
        .unwrap_or_else(|e| {
            eprintln!("error: failed to listen on {listen}: {e}");
            std::process::exit(1);
        });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
