//! A faked Kubernetes API server behind kube's `Client`, on tower-test's mock
//! service (kube's documented way to test controllers without a cluster).
//!
//! It keeps objects in memory and answers GET, POST, PUT and PATCH (server-side
//! apply, status included) the way the API server does for the paths a
//! controller uses, and records every request (method, path, query, body) so
//! tests can assert exactly what a reconcile sent.
//!
//! It also reviews tokens (TokenReview) that a test registered, and can
//! listen on loopback HTTP ([`FakeApiServer::listen`]) for programs that run
//! as processes with a kubeconfig (the node agents).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

impl Recorded {
    /// `METHOD path`, for compact assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// Token → what a TokenReview of it answers (`status.user`) and the
    /// audiences it was issued for.
    tokens: BTreeMap<String, (Value, Vec<String>)>,
    next_uid: u64,
    next_version: u64,
}

#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

impl FakeApiServer {
    /// A client whose every request is answered by a new fake server.
    pub fn start() -> (Client, FakeApiServer) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = FakeApiServer {
            state: Arc::new(Mutex::new(State::default())),
        };
        let s = server.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = s.handle(request).await;
                respond.send_response(response);
            }
        });
        (Client::new(service, "default"), server)
    }

    /// Stores an object at its path, as if it had been created before the test.
    pub fn insert(&self, path: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        stamp_new(&mut state, &mut object);
        state.objects.insert(path.to_owned(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn remove(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.remove(path)
    }

    /// Registers a projected service-account token of a pod, issued for
    /// `audiences`: a TokenReview of it authenticates it for those only.
    pub fn pod_token(
        &self,
        token: &str,
        namespace: &str,
        pod: &str,
        uid: &str,
        audiences: &[&str],
    ) {
        let user = json!({
            "username": format!("system:serviceaccount:{namespace}:default"),
            "uid": "sa-uid",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}")],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uid],
            },
        });
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), (user, audiences));
    }

    /// Serves this fake over HTTP on a free loopback port; returns the port.
    pub async fn listen(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = self.clone();
        let router = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let server = server.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, 16 << 20)
                    .await
                    .unwrap_or_default();
                let request = Request::from_parts(parts, Body::from(bytes.to_vec()));
                let response = server.handle(request).await;
                let (parts, body) = response.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        port
    }

    /// A kubeconfig for [`FakeApiServer::listen`]'s port.
    pub fn kubeconfig(port: u16, path: &std::path::Path) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://127.0.0.1:{port}'}}\n\
             users:\n- name: fake\n  user: {{token: agent}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        );
        std::fs::write(path, config).unwrap();
    }

    /// Every request so far, and forgets them.
    pub fn take_requests(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.state.lock().unwrap().requests)
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Option<Value> =
            (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON body"));
        let mut state = self.state.lock().unwrap();
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        let (status, value) = match method.as_str() {
            "GET" => match state.objects.get(&path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None if is_collection(&path) => (StatusCode::OK, list(&state, &path, &query)),
                None => not_found(&path),
            },
            "POST" if path == "/apis/authentication.k8s.io/v1/tokenreviews" => {
                let mut review = body.expect("a TokenReview has a body");
                let token = review["spec"]["token"].as_str().unwrap_or_default();
                let asked: Vec<String> = review["spec"]["audiences"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                review["status"] = match state.tokens.get(token) {
                    Some((user, issued)) if asked.iter().all(|a| issued.contains(a)) => {
                        json!({"authenticated": true, "user": user, "audiences": asked})
                    }
                    _ => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
                (StatusCode::CREATED, review)
            }
            "POST" => {
                let mut object = body.expect("POST has a body");
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("generated-{}", state.next_uid));
                object["metadata"]["name"] = json!(name);
                let at = format!("{path}/{name}");
                if state.objects.contains_key(&at) {
                    conflict(&at, "AlreadyExists")
                } else {
                    stamp_new(&mut state, &mut object);
                    state.objects.insert(at, object.clone());
                    (StatusCode::CREATED, object)
                }
            }
            "PUT" => {
                let mut object = body.expect("PUT has a body");
                match state.objects.get(&path).cloned() {
                    None => not_found(&path),
                    Some(current)
                        if current["metadata"]["resourceVersion"]
                            != object["metadata"]["resourceVersion"] =>
                    {
                        conflict(&path, "Conflict")
                    }
                    Some(current) => {
                        object["metadata"]["uid"] = current["metadata"]["uid"].clone();
                        bump(&mut state, &mut object);
                        state.objects.insert(path.clone(), object.clone());
                        (StatusCode::OK, object)
                    }
                }
            }
            "PATCH" => {
                let patch = body.expect("PATCH has a body");
                if let Some(parent) = path.strip_suffix("/status") {
                    match state.objects.get(parent).cloned() {
                        None => not_found(parent),
                        Some(mut object) => {
                            object["status"] = patch["status"].clone();
                            bump(&mut state, &mut object);
                            state.objects.insert(parent.to_owned(), object.clone());
                            (StatusCode::OK, object)
                        }
                    }
                } else {
                    // Server-side apply: the applied fields become the object;
                    // identity and status stay the server's.
                    let mut object = patch;
                    match state.objects.get(&path).cloned() {
                        Some(current) => {
                            object["metadata"]["uid"] = current["metadata"]["uid"].clone();
                            object["metadata"]["resourceVersion"] =
                                current["metadata"]["resourceVersion"].clone();
                            if let Some(status) = current.get("status") {
                                object["status"] = status.clone();
                            }
                            if current != object {
                                bump(&mut state, &mut object);
                            }
                        }
                        None => stamp_new(&mut state, &mut object),
                    }
                    state.objects.insert(path.clone(), object.clone());
                    (StatusCode::OK, object)
                }
            }
            "DELETE" => match state.objects.remove(&path) {
                Some(o) => (StatusCode::OK, o),
                None => not_found(&path),
            },
            other => panic!("the fake API server does not handle {other} {path}"),
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&value).unwrap()))
            .unwrap()
    }
}

/// `/api/v1/namespaces/ns/pods` or `/apis/group/version/namespaces/ns/kind`.
fn is_collection(path: &str) -> bool {
    let segments = path.trim_matches('/').split('/').count();
    (path.starts_with("/api/") && segments == 5)
        || (path.starts_with("/apis/") && segments == 6)
        || all_namespaces(path).is_some()
}

/// For `/apis/<group>/<version>/<plural>` (a list across namespaces), the
/// group-version prefix and the plural.
fn all_namespaces(path: &str) -> Option<(String, String)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["apis", group, version, plural] => Some((
            format!("/apis/{group}/{version}/namespaces/"),
            plural.to_string(),
        )),
        _ => None,
    }
}

/// The objects of a collection that match the `labelSelector` (equality
/// terms only, which is what the controller sends for matchLabels).
fn list(state: &State, path: &str, query: &str) -> Value {
    let selector: Vec<(String, String)> = query
        .split('&')
        .filter_map(|p| p.strip_prefix("labelSelector="))
        .flat_map(|s| {
            let decoded = s
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/");
            decoded
                .split(',')
                .filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect::<Vec<_>>()
        })
        .collect();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|(p, _)| match all_namespaces(path) {
            // <namespace>/<plural>/<name>
            Some((prefix, plural)) => p.strip_prefix(&prefix).is_some_and(|r| {
                let parts: Vec<&str> = r.split('/').collect();
                parts.len() == 3 && parts[1] == plural
            }),
            None => p
                .strip_prefix(path)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|r| !r.contains('/')),
        })
        .map(|(_, o)| o.clone())
        .filter(|o| {
            selector
                .iter()
                .all(|(k, v)| o["metadata"]["labels"][k] == json!(v))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": state.next_version.to_string()}, "items": items})
}

fn stamp_new(state: &mut State, object: &mut Value) {
    state.next_uid += 1;
    if object["metadata"]["uid"].is_null() {
        object["metadata"]["uid"] = json!(format!("uid-{}", state.next_uid));
    }
    if object["metadata"]["generation"].is_null() {
        object["metadata"]["generation"] = json!(1);
    }
    bump(state, object);
}

fn bump(state: &mut State, object: &mut Value) {
    state.next_version += 1;
    object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status(404, "NotFound", format!("{path} not found")),
    )
}

fn conflict(path: &str, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        status(409, reason, format!("{path}: {reason}")),
    )
}
