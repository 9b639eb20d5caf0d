//! The harness starts real services, round-trips data through them and tears
//! them down. Every later test builds on these services.

mod support;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use support::{HttpServer, RedisServer, S3Server, port_is_open, raw_request};

fn s3_client(server: &S3Server, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(server.region.clone()))
        .endpoint_url(server.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &server.access_key,
            secret,
            None,
            None,
            "harness",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Deterministic bytes that are not all alike, so a misplaced range shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn put_and_get(client: &aws_sdk_s3::Client, bucket: &str, body: &[u8]) -> Vec<u8> {
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("create bucket");
    client
        .put_object()
        .bucket(bucket)
        .key("model/v1/weights.bin")
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .expect("put object");
    let got = client
        .get_object()
        .bucket(bucket)
        .key("model/v1/weights.bin")
        .send()
        .await
        .expect("get object");
    got.body
        .collect()
        .await
        .expect("read body")
        .into_bytes()
        .to_vec()
}

#[tokio::test]
async fn redis_and_s3_round_trip_then_tear_down() {
    let redis = RedisServer::start_with(Some("harness-pw"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let s3 = S3Server::moto().unwrap_or_else(|e| panic!("{e}"));
    let (redis_port, s3_port) = (redis.port(), s3.port());

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .expect("connect with the password");
    let _: () = redis::cmd("SET")
        .arg("mc:{m}:v1:result:abc")
        .arg("cached")
        .query_async(&mut conn)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg("mc:{m}:v1:result:abc")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "cached");
    // Configured as a cache: nothing is persisted.
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(save, vec!["save".to_string(), String::new()]);

    let body = payload(3 * 1024 * 1024 + 17);
    let got = put_and_get(&s3_client(&s3, &s3.secret_key), "models", &body).await;
    assert_eq!(got, body);

    drop(conn);
    drop(redis);
    drop(s3);
    assert!(
        !port_is_open(redis_port),
        "redis-server still listens after teardown"
    );
    assert!(!port_is_open(s3_port), "moto still listens after teardown");
}

#[tokio::test]
async fn redis_rejects_a_wrong_password() {
    let redis = RedisServer::start_with(Some("right"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port());
    let client = redis::Client::open(url).unwrap();
    let err = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .expect_err("a wrong password must fail");
    assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed, "{err}");
}

#[tokio::test]
async fn s3s_fs_round_trips_and_checks_signatures() {
    let s3 = S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    let body = payload(256 * 1024);
    let got = put_and_get(&s3_client(&s3, &s3.secret_key), "models", &body).await;
    assert_eq!(got, body);

    let wrong = s3_client(&s3, "not-the-secret");
    let err = wrong
        .get_object()
        .bucket("models")
        .key("model/v1/weights.bin")
        .send()
        .await
        .expect_err("a wrong secret must be rejected");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(403), "{err:?}");
}

#[test]
fn nginx_serves_byte_ranges() {
    let root = tempfile::tempdir().unwrap();
    let body = payload(1 << 20);
    std::fs::create_dir_all(root.path().join("m/v1")).unwrap();
    std::fs::write(root.path().join("m/v1/weights.bin"), &body).unwrap();
    let http = HttpServer::start(root.path()).unwrap_or_else(|e| panic!("{e}"));
    let port = http.port();

    let full = raw_request(
        port,
        b"GET /m/v1/weights.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let split = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(full.starts_with(b"HTTP/1.1 200"));
    assert_eq!(&full[split..], &body[..]);

    let ranged = raw_request(
        port,
        b"GET /m/v1/weights.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-1999\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let head = String::from_utf8_lossy(
        &ranged[..ranged.windows(4).position(|w| w == b"\r\n\r\n").unwrap()],
    )
    .to_string();
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert!(
        head.contains("Content-Range: bytes 1000-1999/1048576"),
        "{head}"
    );
    let split = ranged.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(&ranged[split..], &body[1000..2000]);

    drop(http);
    assert!(!port_is_open(port), "nginx still listens after teardown");
}

#[test]
fn a_service_that_cannot_start_fails_with_a_message() {
    let err =
        RedisServer::start_program(std::path::Path::new("/nonexistent/redis-server"), None, &[])
            .err()
            .expect("a missing binary must not start");
    let message = err.to_string();
    assert!(
        message.contains("redis-server") && message.contains("/nonexistent"),
        "{message}"
    );

    // A server that exits at once (an invalid option) reports its own log.
    let err = RedisServer::start_with(None, &[("maxmemory-policy", "not-a-policy")])
        .err()
        .expect("an invalid config must not start");
    let message = err.to_string();
    assert!(
        message.contains("failed to start redis-server"),
        "{message}"
    );
    assert!(
        message.contains("maxmemory-policy") || message.contains("argument"),
        "{message}"
    );
}
