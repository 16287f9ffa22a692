//! The dashboard over the real daemon's listener, as plain HTTP: status codes, headers,
//! escaping of hostile names, and the numbers on the page against `/api/v1/status`.
//! (`browser.rs` drives the same pages in headless Chromium.)

use crate::daemon_util::*;
use crate::util::*;
use serde_json::Value;

pub const HOSTILE: &str = "<img src=x onerror=alert(1)>";

/// The example repository with one tenant named [`HOSTILE`], committed; its commit.
pub fn hostile_example() -> (tempfile::TempDir, String) {
    let (repo, _) = committed_example();
    edit(
        &repo.path().join("tenants/bluesky-net/tenant.yaml"),
        "name: BlueSky Networks",
        &format!("name: \"{HOSTILE}\""),
    );
    let c = git_commit_all(repo.path(), "a hostile tenant name");
    (repo, c)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The `(status, count)` pairs of the counts at the top of `/`.
fn counts(html: &str) -> Vec<(String, u64)> {
    let re = regex::Regex::new(r#"data-status="(\w+)" data-count="(\d+)""#).unwrap();
    re.captures_iter(html).map(|c| (c[1].to_owned(), c[2].parse().unwrap())).collect()
}

/// The tenant ids of the rows of `/`.
fn rows(html: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"<tr data-tenant="([^"]*)""#).unwrap();
    re.captures_iter(html).map(|c| c[1].to_owned()).collect()
}

/// What a page must never contain for the CSP to hold without `unsafe-inline`: inline
/// script, inline event handlers, inline styles.
fn assert_no_inline_code(path: &str, html: &str) {
    let script = regex::Regex::new(r"<script\b([^>]*)>").unwrap();
    for c in script.captures_iter(html) {
        assert!(c[1].contains("src=\"/assets/"), "{path}: an inline script: {}", &c[0]);
    }
    let attr = regex::Regex::new(r#"<[a-zA-Z][^>]*\s(on[a-z]+|style)\s*="#).unwrap();
    assert!(!attr.is_match(html), "{path}: an inline handler or style: {:?}", attr.find(html).map(|m| m.as_str()));
}

fn get_page(d: &Daemon, path: &str) -> (u16, Vec<(String, String)>, String) {
    exchange(&d.addr, "GET", path, &[], b"")
}

#[test]
fn dashboard_pages_answer_escape_and_match_the_status_api() {
    let (repo, c) = hostile_example();
    let r = repo.path();
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &[]);
    d.wait_all("Synced", &c);
    let status = d.status();

    // The list: HTML with the security headers, every count as the API says.
    let (code, h, html) = get_page(&d, "/");
    assert_eq!(code, 200, "{html}");
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    let csp = header(&h, "content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&h, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    let shown = counts(&html);
    assert_eq!(shown.len(), 5, "one count per status: {shown:?}");
    for (word, n) in &shown {
        assert_eq!(status["summary"][word], Value::from(*n), "{word}: {status}");
    }
    assert_eq!(shown.iter().find(|(w, _)| w == "Synced").map(|x| x.1), Some(5));
    let all = status["tenants"].as_array().unwrap();
    assert!(html.contains(&format!(r#"<span class="n">{}</span> all"#, all.len())));
    assert_eq!(rows(&html), all.iter().map(|t| t["tenant"].as_str().unwrap().to_owned()).collect::<Vec<_>>());
    for t in all {
        assert!(html.contains(&format!(">{}</td>", t["plan"].as_str().unwrap())), "plan of {}", t["tenant"]);
    }

    // The hostile name is text, wherever it shows.
    for path in ["/", "/?q=bluesky", "/tenants/bluesky-net", "/audit", "/audit?tenant=bluesky-net"] {
        let (code, _, html) = get_page(&d, path);
        assert_eq!(code, 200, "{path}");
        assert!(!html.contains(HOSTILE) && !html.contains("<img"), "{path}: unescaped name");
        assert_no_inline_code(path, &html);
    }
    let (_, _, html) = get_page(&d, "/tenants/bluesky-net");
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"), "the name shows, escaped");

    // Filter and search.
    let (_, _, html) = get_page(&d, "/?q=NORTH");
    assert_eq!(rows(&html), ["northwind-isp"]);
    let (_, _, html) = get_page(&d, "/?q=%3Cimg");
    assert_eq!(rows(&html), ["bluesky-net"], "a search by (part of) the name");
    let (_, _, html) = get_page(&d, "/?status=Drifted");
    assert!(rows(&html).is_empty() && html.contains("No tenant matches this filter"));
    let (_, _, html) = get_page(&d, "/?status=Synced&per=2&page=2&sort=name");
    assert_eq!(rows(&html).len(), 2);
    assert!(html.contains("3–4 of 5"), "the pager says where it is");

    // A tenant: its resources, its last plan, its audit entries.
    let (code, _, html) = get_page(&d, "/tenants/tenant-123");
    assert_eq!(code, 200);
    assert!(html.contains("<code>isp.config</code>") && html.contains("Demo ISP"));
    assert!(html.contains("id=\"plan\"") && html.contains("id=\"consistency\""));
    assert!(html.contains("<span class=\"action create\">create</span>"), "the daemon's apply is in its audit entries");

    // The audit log, with filters.
    let (code, _, html) = get_page(&d, "/audit?tenant=tenant-123&action=create");
    assert_eq!(code, 200);
    assert!(html.matches("<tr>").count() > 1, "entries shown");
    assert!(!html.contains("&#x2f;tenants&#x2f;northwind-isp"), "only the tenant asked for");
    let (_, _, html) = get_page(&d, "/audit?outcome=failed");
    assert!(html.contains("No entries match."));

    // What is not there; what cannot be done.
    let (code, _, html) = get_page(&d, "/tenants/%3Cscript%3Ealert(1)%3C%2Fscript%3E");
    assert_eq!(code, 404);
    assert!(!html.contains("<script>alert") && html.contains("&lt;script&gt;alert(1)"), "{html}");
    assert_eq!(get_page(&d, "/assets/nothing.js").0, 404);
    assert_eq!(get_page(&d, "/assets/..%2Fmod.rs").0, 404);
    let (code, h, js) = get_page(&d, "/assets/dashboard.js");
    assert_eq!(code, 200);
    assert_eq!(header(&h, "content-type"), Some("text/javascript; charset=utf-8"));
    assert!(js.contains("X-Dotmac-Refresh"));
    assert_eq!(header(&get_page(&d, "/assets/dashboard.css").1, "content-type"), Some("text/css; charset=utf-8"));
    for path in ["/", "/tenants/tenant-123", "/audit"] {
        assert_eq!(exchange(&d.addr, "POST", path, &[], b"").0, 405, "POST {path}: read-only");
    }

    // A loopback listener answers loopback names only (DNS rebinding).
    let (code, h, _) = exchange(&d.addr, "GET", "/", &[("Host", "dashboard.attacker.example")], b"");
    assert_eq!(code, 421);
    assert!(header(&h, "content-security-policy").is_some(), "refusals carry the headers too");
    let port = d.addr.rsplit(':').next().unwrap();
    assert_eq!(exchange(&d.addr, "GET", "/", &[("Host", &format!("localhost:{port}"))], b"").0, 200);
    assert_eq!(exchange(&d.addr, "GET", "/healthz", &[("Host", "probe.cluster.local")], b"").0, 200);
}

#[test]
fn dashboard_asks_for_the_token_when_one_is_set() {
    use base64::Engine;
    let (repo, _) = committed_example();
    let token = "dash-t0ken";
    let d = Daemon::start(repo.path(), &["--auth-token-env", "DASH_TOKEN"], &[("DASH_TOKEN", token)]);
    let (code, h, _) = get_page(&d, "/");
    assert_eq!(code, 401);
    assert!(header(&h, "www-authenticate").is_some_and(|v| v.starts_with("Basic ")), "a browser asks: {h:?}");
    assert_eq!(exchange(&d.addr, "GET", "/api/v1/status", &[("Authorization", "Bearer wrong")], b"").0, 401);
    let bearer = format!("Bearer {token}");
    assert_eq!(exchange(&d.addr, "GET", "/", &[("Authorization", &bearer)], b"").0, 200);
    assert_eq!(exchange(&d.addr, "GET", "/api/v1/status", &[("Authorization", &bearer)], b"").0, 200);
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("dotmac:{token}")));
    assert_eq!(exchange(&d.addr, "GET", "/audit", &[("Authorization", &basic)], b"").0, 200);
    // Basic (which a browser sends by itself) does not reach what changes things.
    let reconcile = "/api/v1/tenants/tenant-123/reconcile";
    assert_eq!(exchange(&d.addr, "POST", reconcile, &[("Authorization", &basic)], b"").0, 401);
    assert_ne!(exchange(&d.addr, "POST", reconcile, &[("Authorization", &bearer)], b"").0, 401);
    for open in ["/healthz", "/metrics"] {
        assert_eq!(get_page(&d, open).0, 200, "{open} stays open");
    }
    let (_, log) = d.stop();
    assert!(!log.contains(token), "the token is never logged");
}

#[test]
fn a_daemon_without_the_token_variable_does_not_start() {
    let (repo, _) = committed_example();
    let out = run_env(&["daemon", "--auth-token-env", "DOTMAC_NO_SUCH_VAR"], repo.path(), &[]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("DOTMAC_NO_SUCH_VAR"), "names the variable: {}", out.stderr);
}
