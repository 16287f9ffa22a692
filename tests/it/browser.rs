//! The dashboard in headless Chromium (driven over CDP by `cdp.rs`): the pages load with no
//! console error and no CSP violation, the filter narrows the table as you type, the page
//! follows a status change by itself without reloading, a tenant page shows its coloured
//! diff, and a tenant named `<img src=x onerror=alert(1)>` runs no script.
//!
//! Screenshots of the three pages go to `$DOTMAC_SCREENSHOTS` when set (the README's come
//! from `DOTMAC_SCREENSHOTS=docs cargo test --test it browser`), else to a temp folder.
//! Without Chromium the test skips loudly, and fails under `DOTMAC_REQUIRE_ALL=1`.

use crate::cdp::{Browser, Tab};
use crate::daemon_util::*;
use crate::dashboard::{HOSTILE, hostile_example};
use crate::util::*;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Fails on anything the browser complained about so far, and on CSP violations the page
/// saw (`where` names the step).
fn assert_clean(b: &mut Browser, tab: &Tab, at: &str) {
    let csp = tab.eval(b, "window.__csp");
    assert_eq!(csp, json!([]), "{at}: CSP violations");
    let problems = b.problems();
    assert!(problems.is_empty(), "{at}: the browser reported:\n{}", problems.join("\n"));
}

fn save(dir: &Path, name: &str, png: &[u8]) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{name}: not a real screenshot");
    std::fs::write(dir.join(name), png).unwrap();
}

/// The rows of the tenant table, as `[id, status]` pairs.
const ROWS: &str = "[...document.querySelectorAll('#tenants tbody tr')].map(r => [r.dataset.tenant, r.dataset.status])";

/// Sets a form control's value and fires `input`, as picking an option does.
fn set_control(b: &mut Browser, tab: &Tab, selector: &str, value: &str) {
    tab.eval(
        b,
        &format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.value = {value:?}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
        ),
    );
}

#[test]
fn dashboard_in_headless_chromium() {
    let Some(mut b) = Browser::launch("dashboard_in_headless_chromium") else { return };
    let shots_tmp = tempfile::tempdir().unwrap();
    let shots = std::env::var_os("DOTMAC_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| shots_tmp.path().into());
    std::fs::create_dir_all(&shots).unwrap();

    // Applied by hand first, then watched by a report-only daemon: drift stays on show.
    let (repo, c) = hostile_example();
    let r = repo.path();
    let out = run_env(&["apply", "--auto-approve"], r, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let d = Daemon::start(r, &["--interval", "1s"], &[]);
    let status = d.wait_all("Synced", &c);
    let base = format!("http://{}", d.addr);
    let tab = b.tab();

    // The list: the script runs (it shows the live switch), the counts are the API's.
    tab.goto(&mut b, &format!("{base}/"));
    tab.wait_until(&mut b, "the script to start", "!document.querySelector('.refresh').hidden");
    let counts = tab.eval(
        &mut b,
        "Object.fromEntries([...document.querySelectorAll('a.count[data-status]')]\
         .map(a => [a.dataset.status, Number(a.dataset.count)]))",
    );
    assert_eq!(counts.as_object().map(|m| m.len()), Some(5), "{counts}");
    for (word, n) in counts.as_object().unwrap() {
        assert_eq!(&status["summary"][word], n, "{word}");
    }
    // The hostile name is text: no image element, no alert, the name reads as written.
    assert_eq!(tab.eval(&mut b, "document.images.length"), json!(0));
    let name = tab.eval(&mut b, "document.querySelector('tr[data-tenant=\"bluesky-net\"] .name').textContent");
    assert_eq!(name, json!(HOSTILE));
    assert_clean(&mut b, &tab, "/");

    // Filter as you type (no reload: a marker on the window survives).
    tab.eval(&mut b, "window.__marker = 'same document'");
    tab.type_into(&mut b, "input[name=q]", "north");
    tab.wait_until(
        &mut b,
        "the search to narrow the table",
        &format!("JSON.stringify({ROWS}) === '[[\"northwind-isp\",\"Synced\"]]' && location.search === '?q=north'"),
    );
    set_control(&mut b, &tab, "input[name=q]", "");
    set_control(&mut b, &tab, "select[name=status]", "Drifted");
    tab.wait_until(
        &mut b,
        "the status filter to empty the table",
        &format!("{ROWS}.length === 0 && location.search === '?status=Drifted' && !!document.querySelector('p.empty')"),
    );
    set_control(&mut b, &tab, "select[name=status]", "");
    tab.wait_until(&mut b, "every tenant back", &format!("{ROWS}.length === 5"));

    // Drift on tenant-123's live ISP config: the open page shows it by itself.
    let state = r.join(".dotmac");
    let text = live_entry(&state, "tenant-123/isp.config").expect("tenant-123's ISP config in live");
    let line = text.lines().find(|l| l.contains("sync_interval_minutes:")).expect("the interval in live").to_owned();
    let drifted = format!("{}sync_interval_minutes: 99", &line[..line.find('s').unwrap()]);
    edit_live(&state, "tenant-123/isp.config", &line, &drifted);
    tab.wait_until(
        &mut b,
        "the page to refresh itself with the drift",
        "document.querySelector('a.count[data-status=Drifted]').dataset.count === '1' && \
         document.querySelector('tr[data-tenant=\"tenant-123\"]').dataset.status === 'Drifted'",
    );
    assert_eq!(tab.eval(&mut b, "window.__marker"), json!("same document"), "refreshed without a reload");
    assert_eq!(d.status()["summary"]["Drifted"], 1, "the API agrees");
    assert_clean(&mut b, &tab, "/ after refreshes");
    save(&shots, "dashboard-tenants.png", &tab.screenshot(&mut b, 1400.0));

    // The tenant: its drift and the last plan's diff, coloured.
    tab.goto(&mut b, &format!("{base}/tenants/tenant-123"));
    let del = tab.eval(&mut b, "[...document.querySelectorAll('pre.diff .del')].map(e => e.textContent).join('\\n')");
    let add = tab.eval(&mut b, "[...document.querySelectorAll('pre.diff .add')].map(e => e.textContent).join('\\n')");
    assert!(del.as_str().unwrap().contains("sync_interval_minutes: 99"), "live's value, removed: {del}");
    assert!(add.as_str().unwrap().contains(line.trim()), "the repository's value, added: {add}");
    let colour = tab.eval(&mut b, "getComputedStyle(document.querySelector('pre.diff .add')).backgroundColor");
    assert_ne!(colour, json!("rgba(0, 0, 0, 0)"), "added lines are coloured (the stylesheet loaded)");
    let drift = tab.eval(&mut b, "document.querySelector('#drift table').textContent");
    assert!(drift.as_str().unwrap().contains("isp.config"), "{drift}");
    assert_clean(&mut b, &tab, "/tenants/tenant-123");
    save(&shots, "dashboard-tenant.png", &tab.screenshot(&mut b, 2000.0));

    // The hostile tenant's own page: still text.
    tab.goto(&mut b, &format!("{base}/tenants/bluesky-net"));
    assert_eq!(tab.eval(&mut b, "document.images.length"), json!(0));
    assert_eq!(tab.eval(&mut b, "document.querySelector('.tenant-head .name').textContent"), json!(HOSTILE));
    assert_clean(&mut b, &tab, "/tenants/bluesky-net");

    // The audit log: the apply's entries; a filter that matches none.
    tab.goto(&mut b, &format!("{base}/audit"));
    let n = tab.eval(&mut b, "document.querySelectorAll('table.audit tbody tr').length");
    assert!(n.as_u64().unwrap() > 10, "{n} entries");
    save(&shots, "dashboard-audit.png", &tab.screenshot(&mut b, 1400.0));
    set_control(&mut b, &tab, "select[name=outcome]", "failed");
    tab.wait_until(
        &mut b,
        "the outcome filter",
        "document.querySelectorAll('table.audit tbody tr').length === 0 && location.search === '?outcome=failed'",
    );
    assert_clean(&mut b, &tab, "/audit");
}
