//! A stand-in for GitHub's REST API, on a loopback port, for the comment poster: list an
//! issue's comments (paginated, with a `Link` header), create one, update one. It lives
//! under `/api/v3` as on GitHub Enterprise Server, so the API URL's path is exercised.
//!
//! Some repository names make it answer as GitHub does when something is wrong:
//! `forbidden` 403, `missing` 404, `invalid` 422 on create, `ratelimited` 403 with the
//! rate-limit headers, `flaky` one 502 before answering.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "ghs_FakeToken0123456789abcdef";

#[derive(Debug, Clone)]
pub struct Comment {
    pub id: u64,
    pub body: String,
}

#[derive(Default)]
pub struct Inner {
    pub comments: BTreeMap<(String, u64), Vec<Comment>>,
    pub next_id: u64,
    /// Every request, as `METHOD path?query`.
    pub requests: Vec<String>,
    flaky_failed: bool,
    api: String,
}

pub struct FakeGithub {
    /// The API root, e.g. `http://127.0.0.1:PORT/api/v3`.
    pub api: String,
    pub state: Arc<Mutex<Inner>>,
    _rt: tokio::runtime::Runtime,
}

type Shared = Arc<Mutex<Inner>>;

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message, "documentation_url": "https://docs.github.com/rest" }))).into_response()
}

/// The checks every endpoint makes first: the token, and the repository's planned failure.
fn refuse(s: &mut Inner, headers: &HeaderMap, owner: &str, repo: &str, write: bool) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return Some(error(StatusCode::UNAUTHORIZED, "Bad credentials"));
    }
    if headers.get("user-agent").is_none() {
        return Some(error(
            StatusCode::FORBIDDEN,
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header",
        ));
    }
    let _ = owner;
    match repo {
        "forbidden" => Some(error(StatusCode::FORBIDDEN, "Resource not accessible by integration")),
        "missing" => Some(error(StatusCode::NOT_FOUND, "Not Found")),
        "ratelimited" => {
            let mut r = error(StatusCode::FORBIDDEN, "API rate limit exceeded for installation ID 1.");
            r.headers_mut().insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            r.headers_mut().insert("x-ratelimit-reset", HeaderValue::from_static("1795000000"));
            Some(r)
        }
        "flaky" if !s.flaky_failed => {
            s.flaky_failed = true;
            Some(error(StatusCode::BAD_GATEWAY, "Server Error"))
        }
        "invalid" if write => Some(
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({
                    "message": "Validation Failed",
                    "errors": [{"resource": "IssueComment", "code": "custom", "field": "body",
                                "message": "body is too long (maximum is 65536 characters)"}],
                })),
            )
                .into_response(),
        ),
        _ => None,
    }
}

fn comment_json(owner: &str, repo: &str, pr: u64, c: &Comment) -> Value {
    json!({
        "id": c.id,
        "body": c.body,
        "html_url": format!("https://github.example/{owner}/{repo}/pull/{pr}#issuecomment-{}", c.id),
        "user": {"login": "github-actions[bot]", "type": "Bot"},
    })
}

async fn list(
    State(s): State<Shared>,
    Path((owner, repo, pr)): Path<(String, String, u64)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut s = s.lock().unwrap();
    let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    s.requests.push(format!("GET /repos/{owner}/{repo}/issues/{pr}/comments?{}", query.join("&")));
    if let Some(r) = refuse(&mut s, &headers, &owner, &repo, false) {
        return r;
    }
    let per_page: usize = q.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(30).min(100);
    let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let all = s.comments.get(&(format!("{owner}/{repo}"), pr)).cloned().unwrap_or_default();
    let items: Vec<Value> =
        all.iter().skip((page - 1) * per_page).take(per_page).map(|c| comment_json(&owner, &repo, pr, c)).collect();
    let mut resp = Json(Value::Array(items)).into_response();
    if page * per_page < all.len() {
        let next = format!(
            "<{}/repos/{owner}/{repo}/issues/{pr}/comments?per_page={per_page}&page={}>; rel=\"next\"",
            s.api,
            page + 1
        );
        resp.headers_mut().insert("link", HeaderValue::from_str(&next).unwrap());
    }
    resp
}

async fn create(
    State(s): State<Shared>,
    Path((owner, repo, pr)): Path<(String, String, u64)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("POST /repos/{owner}/{repo}/issues/{pr}/comments"));
    if let Some(r) = refuse(&mut s, &headers, &owner, &repo, true) {
        return r;
    }
    let Some(text) = body.get("body").and_then(Value::as_str) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request. \"body\" wasn't supplied.");
    };
    s.next_id += 1;
    let c = Comment { id: s.next_id, body: text.to_owned() };
    s.comments.entry((format!("{owner}/{repo}"), pr)).or_default().push(c.clone());
    (StatusCode::CREATED, Json(comment_json(&owner, &repo, pr, &c))).into_response()
}

async fn update(
    State(s): State<Shared>,
    Path((owner, repo, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("PATCH /repos/{owner}/{repo}/issues/comments/{id}"));
    if let Some(r) = refuse(&mut s, &headers, &owner, &repo, true) {
        return r;
    }
    let text = body.get("body").and_then(Value::as_str).unwrap_or_default().to_owned();
    let key = format!("{owner}/{repo}");
    for ((r, pr), list) in s.comments.iter_mut() {
        if *r != key {
            continue;
        }
        if let Some(c) = list.iter_mut().find(|c| c.id == id) {
            c.body = text;
            return Json(comment_json(&owner, &repo, *pr, c)).into_response();
        }
    }
    error(StatusCode::NOT_FOUND, "Not Found")
}

impl FakeGithub {
    pub fn start() -> FakeGithub {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let api = format!("http://{}/api/v3", listener.local_addr().unwrap());
        let state: Shared = Arc::new(Mutex::new(Inner { api: api.clone(), ..Default::default() }));
        let app = axum::Router::new()
            .route("/api/v3/repos/{owner}/{repo}/issues/{pr}/comments", get(list).post(create))
            .route("/api/v3/repos/{owner}/{repo}/issues/comments/{id}", patch(update))
            .with_state(state.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        FakeGithub { api, state, _rt: rt }
    }

    /// Comments by others, so that the poster has pages to look through.
    pub fn seed(&self, repo: &str, pr: u64, n: usize) {
        let mut s = self.state.lock().unwrap();
        for i in 0..n {
            s.next_id += 1;
            let c = Comment { id: s.next_id, body: format!("Looks good to me ({i})") };
            s.comments.entry((repo.to_owned(), pr)).or_default().push(c);
        }
    }

    pub fn comments(&self, repo: &str, pr: u64) -> Vec<Comment> {
        self.state.lock().unwrap().comments.get(&(repo.to_owned(), pr)).cloned().unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The variables a workflow job has, for `repo`.
    pub fn env(&self, repo: &str) -> Vec<(&'static str, String)> {
        vec![
            ("GITHUB_TOKEN", TOKEN.to_owned()),
            ("GITHUB_REPOSITORY", repo.to_owned()),
            ("GITHUB_API_URL", self.api.clone()),
        ]
    }
}
