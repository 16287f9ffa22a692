//! One sticky pull-request comment through GitHub's REST API: the comment that starts with a
//! hidden marker (`<!-- marker -->`) is updated; if there is none, one is created. Works
//! with github.com and GitHub Enterprise Server (`GITHUB_API_URL`, `https://HOST/api/v3`).
//!
//! The token is sent only to the configured API URL (pagination links elsewhere are
//! refused) and never appears in an error or a log line.

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::fmt;
use std::time::Duration;

/// Where and as whom to post.
#[derive(Clone)]
pub struct Config {
    /// The REST API root without a trailing slash (`https://api.github.com`).
    pub api_url: String,
    /// `owner/name`.
    pub repository: String,
    pub token: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("api_url", &self.api_url)
            .field("repository", &self.repository)
            .field("token", &"(sensitive)")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {message}")]
    Transport { what: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Config {
    /// From `GITHUB_TOKEN`, `GITHUB_REPOSITORY` and `GITHUB_API_URL` (default
    /// `https://api.github.com`), as a GitHub Actions job has them.
    pub fn from_env() -> Result<Config> {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let token = var("GITHUB_TOKEN").ok_or_else(|| {
            Error::Config(
                "GITHUB_TOKEN is not set: set it to a token that may write pull-request comments (in a workflow: `env: GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}` with `permissions: pull-requests: write`)".into(),
            )
        })?;
        let repository = var("GITHUB_REPOSITORY").ok_or_else(|| {
            Error::Config("GITHUB_REPOSITORY is not set: set it to the repository as owner/name".into())
        })?;
        let api_url = var("GITHUB_API_URL").unwrap_or_else(|| "https://api.github.com".into());
        Config::new(&api_url, &repository, &token)
    }

    pub fn new(api_url: &str, repository: &str, token: &str) -> Result<Config> {
        let parts: Vec<&str> = repository.split('/').collect();
        let name_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if parts.len() != 2 || !parts.iter().all(|p| name_ok(p)) {
            return Err(Error::Config(format!(
                "GITHUB_REPOSITORY `{repository}` is not owner/name (letters, digits, `-`, `_`, `.`)"
            )));
        }
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            return Err(Error::Config(format!(
                "GITHUB_API_URL `{api_url}` is not an http(s) URL (github.com: https://api.github.com; GitHub Enterprise Server: https://HOST/api/v3)"
            )));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::Config("GITHUB_TOKEN contains spaces or control characters".into()));
        }
        Ok(Config {
            api_url: api_url.trim_end_matches('/').to_owned(),
            repository: repository.to_owned(),
            token: token.to_owned(),
        })
    }
}

/// What happened to the comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created {
        id: u64,
        url: String,
    },
    Updated {
        id: u64,
        url: String,
    },
    /// The comment already had this body; nothing was sent.
    Unchanged {
        id: u64,
        url: String,
    },
}

/// The hidden line a sticky comment starts with.
pub fn marker_line(marker: &str) -> Result<String> {
    if marker.is_empty() || marker.contains("--") || marker.contains(['<', '>', '\n', '\r']) {
        return Err(Error::Config(format!(
            "--marker `{marker}` cannot go in an HTML comment: use text without `--`, `<`, `>` or line breaks"
        )));
    }
    Ok(format!("<!-- {marker} -->"))
}

/// The body as posted: the marker line first (added if the body does not start with it).
pub fn with_marker(body: &str, marker: &str) -> Result<String> {
    let line = marker_line(marker)?;
    let body = body.strip_prefix('\u{feff}').unwrap_or(body);
    if body.trim_start().starts_with(&line) {
        return Ok(body.to_owned());
    }
    Ok(format!("{line}\n{body}"))
}

#[derive(Debug, Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    html_url: String,
}

/// Most pages of comments read (100 each).
const MAX_PAGES: usize = 300;
/// GitHub's limit on a comment body, in characters.
pub const BODY_LIMIT: usize = 65_536;

pub struct Poster {
    cfg: Config,
    http: Client,
    /// Pause before the first retry of a request that failed on GitHub's side.
    retry_pause: Duration,
}

impl Poster {
    pub fn new(cfg: Config) -> Result<Poster> {
        // reqwest is built without a default TLS provider; the process uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = Client::builder()
            .user_agent(concat!("dotmac-gitops/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Transport { what: "starting the HTTP client".into(), message: e.to_string() })?;
        let pause = std::env::var("DOTMAC_GITHUB_RETRY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        Ok(Poster { cfg, http, retry_pause: Duration::from_millis(pause) })
    }

    /// Creates the pull request's comment that starts with the marker, or updates it.
    pub fn upsert(&self, pr: u64, body: &str, marker: &str) -> Result<Outcome> {
        let body = with_marker(body, marker)?;
        let line = marker_line(marker)?;
        let chars = body.chars().count();
        if chars > BODY_LIMIT {
            return Err(Error::Config(format!(
                "the comment would be {chars} characters, over GitHub's limit of {BODY_LIMIT}; make the report with `--max-chars 65536` (it summarises and truncates)"
            )));
        }
        let repo = &self.cfg.repository;
        let existing = self.find(pr, &line)?;
        match existing {
            Some(c) if c.body.as_deref() == Some(body.as_str()) => Ok(Outcome::Unchanged { id: c.id, url: c.html_url }),
            Some(c) => {
                let what = format!("updating comment {} on pull request #{pr} in {repo}", c.id);
                let url = format!("{}/repos/{repo}/issues/comments/{}", self.cfg.api_url, c.id);
                let resp = self.send(&what, true, || self.http.patch(&url).json(&json!({ "body": body })))?;
                let c: Comment = parse(&what, resp)?;
                Ok(Outcome::Updated { id: c.id, url: c.html_url })
            }
            None => {
                let what = format!("creating a comment on pull request #{pr} in {repo}");
                let url = format!("{}/repos/{repo}/issues/{pr}/comments", self.cfg.api_url);
                // Not retried: a create that reached GitHub but whose answer was lost would
                // make a second comment.
                let resp = self.send(&what, false, || self.http.post(&url).json(&json!({ "body": body })))?;
                let c: Comment = parse(&what, resp)?;
                Ok(Outcome::Created { id: c.id, url: c.html_url })
            }
        }
    }

    /// The first comment (oldest) whose body starts with the marker line, following every page.
    fn find(&self, pr: u64, line: &str) -> Result<Option<Comment>> {
        let repo = &self.cfg.repository;
        let what = format!("listing the comments of pull request #{pr} in {repo}");
        let mut url = format!("{}/repos/{repo}/issues/{pr}/comments?per_page=100", self.cfg.api_url);
        for _ in 0..MAX_PAGES {
            let resp = self.send(&what, true, || self.http.get(&url))?;
            let next = next_link(resp.headers());
            let page: Vec<Comment> = parse(&what, resp)?;
            if let Some(c) =
                page.into_iter().find(|c| c.body.as_deref().is_some_and(|b| b.trim_start().starts_with(line)))
            {
                return Ok(Some(c));
            }
            match next {
                None => return Ok(None),
                Some(n) => {
                    // The token goes only where it was meant to.
                    if !same_origin(&n, &self.cfg.api_url) {
                        return Err(Error::Refused(format!(
                            "{what}: GitHub's next-page link points to another host ({}); refusing to send the token there. Check GITHUB_API_URL=`{}`",
                            origin(&n),
                            self.cfg.api_url
                        )));
                    }
                    url = n;
                }
            }
        }
        Err(Error::Refused(format!("{what}: more than {} comments; giving up", MAX_PAGES * 100)))
    }

    /// Sends a request with the token; retries twice on a server error or a failed
    /// connection when `retry`; turns an error status into a message that says what to check.
    fn send(&self, what: &str, retry: bool, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        let attempts = if retry { 3 } else { 1 };
        let mut pause = self.retry_pause;
        for attempt in 1..=attempts {
            let result = build()
                .bearer_auth(&self.cfg.token)
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
                .send();
            let last = attempt == attempts;
            match result {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) if r.status().is_server_error() && !last => {
                    tracing::warn!(status = %r.status(), attempt, "{what}: GitHub failed; retrying");
                }
                Ok(r) => return Err(self.refusal(what, r)),
                Err(e) if !last && (e.is_connect() || e.is_timeout()) => {
                    tracing::warn!(attempt, "{what}: {}; retrying", transport_message(&e));
                }
                Err(e) => {
                    return Err(Error::Transport {
                        what: what.to_owned(),
                        message: format!(
                            "{} (is GITHUB_API_URL=`{}` reachable from here?)",
                            transport_message(&e),
                            self.cfg.api_url
                        ),
                    });
                }
            }
            std::thread::sleep(pause);
            pause *= 2;
        }
        unreachable!("the last attempt returns")
    }

    fn refusal(&self, what: &str, r: Response) -> Error {
        let status = r.status();
        let header = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let remaining = header("x-ratelimit-remaining");
        let reset = header("x-ratelimit-reset");
        let retry_after = header("retry-after");
        let text = r.text().unwrap_or_default();
        let said = github_message(&text);
        let cfg = &self.cfg;
        let head = format!(
            "{what}: GitHub answered {status}{}",
            if said.is_empty() { String::new() } else { format!(" ({said})") }
        );
        let hint = match status {
            StatusCode::UNAUTHORIZED => "the token was refused: check that GITHUB_TOKEN holds a valid, unexpired token (in a workflow: `secrets.GITHUB_TOKEN`, or the action's `github-token` input)".to_owned(),
            StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS if remaining.as_deref() == Some("0") || retry_after.is_some() => {
                let when = match (retry_after, reset) {
                    (Some(s), _) => format!("retry after {s} s"),
                    (None, Some(r)) => format!("the limit resets at {}", reset_time(&r)),
                    _ => "retry later".into(),
                };
                format!("the API rate limit is exhausted: {when}")
            }
            StatusCode::FORBIDDEN => "the token may not do this: give the workflow `permissions: pull-requests: write`. A pull request from a fork gets a read-only token under `pull_request`: the job summary still has the report".to_owned(),
            StatusCode::NOT_FOUND => format!(
                "check GITHUB_REPOSITORY=`{}` (owner/name), the pull request number, GITHUB_API_URL=`{}` (GitHub Enterprise Server: https://HOST/api/v3), and that the token can read the repository (GitHub answers 404, not 403, for a private repository the token cannot see)",
                cfg.repository, cfg.api_url
            ),
            StatusCode::UNPROCESSABLE_ENTITY => "GitHub rejected the comment: the body may be too long (65,536 characters at most) or empty, or the conversation is locked".to_owned(),
            s if s.is_server_error() => "GitHub failed on its side (after retries); try again later".to_owned(),
            _ => String::new(),
        };
        Error::Refused(if hint.is_empty() { head } else { format!("{head}: {hint}") })
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, r: Response) -> Result<T> {
    let text = r.text().map_err(|e| Error::Transport { what: what.to_owned(), message: transport_message(&e) })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Refused(format!("{what}: GitHub's answer is not what the REST API returns ({e})")))
}

/// `message` and any `errors[].message` of a GitHub error body (at most 300 characters).
fn github_message(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return String::new();
    };
    let mut parts: Vec<String> = v.get("message").and_then(Value::as_str).map(str::to_owned).into_iter().collect();
    for e in v.get("errors").and_then(Value::as_array).into_iter().flatten() {
        if let Some(m) = e.get("message").and_then(Value::as_str).or_else(|| e.as_str()) {
            parts.push(m.to_owned());
        } else if let Some(code) = e.get("code").and_then(Value::as_str) {
            let field = e.get("field").and_then(Value::as_str).unwrap_or("");
            parts.push(format!("{field} {code}").trim().to_owned());
        }
    }
    let s = parts.join("; ");
    s.chars().take(300).collect()
}

/// A transport error without its URL's query (never holds the token, but keep it short).
fn transport_message(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn reset_time(epoch: &str) -> String {
    epoch
        .parse::<i64>()
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| epoch.to_owned())
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p == "rel=\"next\"" || p == "rel=next"
        });
        is_next.then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
    })
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after..].find('/').map(|i| after + i).unwrap_or(url.len());
    &url[..end]
}

fn same_origin(url: &str, api: &str) -> bool {
    origin(url).eq_ignore_ascii_case(origin(api)) && url[origin(url).len()..].starts_with(&api[origin(api).len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_bodies() {
        assert_eq!(marker_line("dotmac-gitops").unwrap(), "<!-- dotmac-gitops -->");
        assert!(marker_line("a-->b").is_err() && marker_line("a\nb").is_err() && marker_line("").is_err());
        assert_eq!(with_marker("hello", "m").unwrap(), "<!-- m -->\nhello");
        assert_eq!(with_marker("<!-- m -->\n## x", "m").unwrap(), "<!-- m -->\n## x");
    }

    #[test]
    fn config_checks_and_hides_the_token() {
        let c = Config::new("https://ghe.example.com/api/v3/", "acme/desired-state", "ghs_secret123").unwrap();
        assert_eq!(c.api_url, "https://ghe.example.com/api/v3");
        assert!(!format!("{c:?}").contains("ghs_secret123"));
        assert!(Config::new("https://api.github.com", "no-slash", "t").is_err());
        assert!(Config::new("ftp://x", "a/b", "t").is_err());
    }

    #[test]
    fn pagination_links_stay_on_the_api() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            r#"<https://api.github.com/repositories/1/issues/5/comments?page=2>; rel="next", <https://api.github.com/repositories/1/issues/5/comments?page=9>; rel="last""#
                .parse()
                .unwrap(),
        );
        let next = next_link(&h).unwrap();
        assert_eq!(next, "https://api.github.com/repositories/1/issues/5/comments?page=2");
        assert!(same_origin(&next, "https://api.github.com"));
        assert!(!same_origin("https://evil.example/x", "https://api.github.com"));
        assert!(same_origin("https://ghe.example.com/api/v3/repos/a/b", "https://ghe.example.com/api/v3"));
        assert!(!same_origin("https://ghe.example.com/other", "https://ghe.example.com/api/v3"));
    }

    #[test]
    fn github_messages_are_read() {
        let body = r#"{"message":"Validation Failed","errors":[{"resource":"IssueComment","code":"custom","field":"body","message":"body is too long (maximum is 65536 characters)"}]}"#;
        assert_eq!(github_message(body), "Validation Failed; body is too long (maximum is 65536 characters)");
        assert_eq!(github_message("not json"), "");
    }
}
