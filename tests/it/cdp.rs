//! A small Chrome DevTools Protocol client for the dashboard's browser tests.
//!
//! Chromium runs headless with `--remote-debugging-pipe`: it reads commands from file
//! descriptor 3 and writes answers and events to 4, each a JSON text ended by a NUL byte.
//! That needs no WebSocket and no crate beyond `libc` and `serde_json`, which the tree has.
//! One tab is driven at a time through a flattened session; every event is kept, so a test
//! can ask afterwards for console errors, exceptions, CSP violations and dialogs.
//!
//! Chromium and everything it starts run in a process group of their own, killed when the
//! [`Browser`] is dropped. Where Chromium is not installed [`Browser::launch`] skips loudly,
//! or fails under `DOTMAC_REQUIRE_ALL=1` (as in `.ci/run`).

#![allow(dead_code)]

use serde_json::{Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long one command may take to be answered, and a page or condition to arrive.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The browser: `$DOTMAC_CHROMIUM`, or the first of the usual names on `PATH`.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DOTMAC_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    /// Every event received so far, in order (with its `sessionId`, if any).
    pub events: Vec<Value>,
    _profile: tempfile::TempDir,
}

/// A pipe with both ends closed on exec; (read end, write end).
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    (fds[0], fds[1])
}

impl Browser {
    /// Starts headless Chromium, or `None` (a loud skip) when it is not installed.
    pub fn launch(test: &str) -> Option<Browser> {
        let Some(bin) = chromium() else {
            crate::util::skip_unless_required(
                test,
                "Chromium",
                "apt-get install chromium, as scripts/test-deps.sh does, or set DOTMAC_CHROMIUM",
            );
            return None;
        };
        Some(Browser::start(&bin))
    }

    fn start(bin: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // Commands: we write `cmd_w`, the browser reads `cmd_r` as fd 3. Answers: the
        // browser writes `out_w` as fd 4, we read `out_r`.
        let (cmd_r, cmd_w) = pipe();
        let (out_r, out_w) = pipe();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--mute-audio",
            "--hide-scrollbars",
            "--window-size=1360,900",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(move || {
                // A group of its own: dropping the browser kills its helpers too.
                libc::setpgid(0, 0);
                // dup2 clears close-on-exec on the copy; an fd already in place keeps it,
                // so move the ends out of the way first.
                let a = libc::fcntl(cmd_r, libc::F_DUPFD, 10);
                let b = libc::fcntl(out_w, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        unsafe {
            libc::close(cmd_r);
            libc::close(out_w);
        }
        let to_browser = unsafe { File::from_raw_fd(cmd_w) };
        let from = unsafe { File::from_raw_fd(out_r) };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                match serde_json::from_slice::<Value>(&buf) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("cdp: unreadable message ({e}): {}", String::from_utf8_lossy(&buf)),
                }
            }
        });
        Browser { child, to_browser, from_browser: rx, next_id: 0, events: Vec::new(), _profile: profile }
    }

    /// Sends a command (to a tab's session, or to the browser) and waits for its answer.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).map_err(|e| format!("{method}: the browser is gone: {e}"))?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let m = self.receive(deadline).ok_or_else(|| format!("{method}: no answer within {PATIENCE:?}"))?;
            if m["id"].as_u64() == Some(id) {
                return match m.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    /// The next message before `deadline`, events recorded (a dialog is dismissed, so that
    /// the page does not hang on it); `None` at the deadline.
    fn receive(&mut self, deadline: Instant) -> Option<Value> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.from_browser.recv_timeout(wait) {
            Ok(m) => {
                if m.get("method").is_some() {
                    if m["method"] == "Page.javascriptDialogOpening" {
                        let session = m["sessionId"].as_str().map(str::to_owned);
                        let mut bytes = serde_json::to_vec(&json!({
                            "id": 0, "method": "Page.handleJavaScriptDialog",
                            "params": {"accept": false}, "sessionId": session,
                        }))
                        .unwrap();
                        bytes.push(0);
                        let _ = self.to_browser.write_all(&bytes);
                    }
                    self.events.push(m.clone());
                }
                Some(m)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the browser closed its pipe (it crashed?)"),
        }
    }

    /// Waits until an event satisfying `f` has arrived (or had); panics after [`PATIENCE`].
    pub fn wait_event(&mut self, what: &str, since: usize, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = since;
        loop {
            if let Some(e) = self.events[seen..].iter().find(|e| f(e)) {
                return e.clone();
            }
            seen = self.events.len();
            if self.receive(deadline).is_none() {
                panic!("waited {PATIENCE:?} for {what}");
            }
        }
    }

    /// Opens a tab and turns on what the tests watch: console, exceptions, log (where CSP
    /// violations are reported), page events, and a listener that keeps every
    /// `securitypolicyviolation` in `window.__csp` (installed by the debugger, so the
    /// page's own policy does not block it).
    pub fn tab(&mut self) -> Tab {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).unwrap();
        let attached =
            self.call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).unwrap();
        let session = attached["sessionId"].as_str().expect("a session id").to_owned();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            self.call(Some(&session), domain, json!({})).unwrap();
        }
        let watch = "window.__csp = []; document.addEventListener('securitypolicyviolation', \
                     (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));";
        self.call(Some(&session), "Page.addScriptToEvaluateOnNewDocument", json!({"source": watch})).unwrap();
        Tab { session }
    }

    /// Console errors, uncaught exceptions, error log entries (CSP reports among them) and
    /// dialogs (an `alert` would be a script that ran), as lines.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.events {
            let p = &e["params"];
            match e["method"].as_str().unwrap_or("") {
                "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
                    out.push(format!("console.{}: {}", p["type"].as_str().unwrap_or(""), p["args"]))
                }
                "Runtime.exceptionThrown" => out.push(format!("exception: {}", p["exceptionDetails"])),
                "Log.entryAdded" if p["entry"]["level"] == "error" => {
                    out.push(format!("log ({}): {} {}", p["entry"]["source"], p["entry"]["text"], p["entry"]["url"]))
                }
                "Page.javascriptDialogOpening" => out.push(format!("dialog {}: {}", p["type"], p["message"])),
                _ => {}
            }
        }
        out
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        let pgid = self.child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The helpers (renderer, zygote) share the group Chromium leads.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// One tab, by its session.
pub struct Tab {
    pub session: String,
}

impl Tab {
    /// Loads `url` and waits for its `load` event.
    pub fn goto(&self, b: &mut Browser, url: &str) {
        let since = b.events.len();
        let r = b.call(Some(&self.session), "Page.navigate", json!({"url": url})).unwrap();
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
        let session = self.session.clone();
        b.wait_event(&format!("{url} to load"), since, |e| {
            e["method"] == "Page.loadEventFired" && e["sessionId"] == session.as_str()
        });
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    pub fn eval(&self, b: &mut Browser, expr: &str) -> Value {
        let r = b
            .call(
                Some(&self.session),
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .unwrap();
        if let Some(e) = r.get("exceptionDetails") {
            panic!("evaluating `{expr}`: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is `true`; panics with `what` after [`PATIENCE`].
    pub fn wait_until(&self, b: &mut Browser, what: &str, expr: &str) {
        let start = Instant::now();
        while self.eval(b, expr) != json!(true) {
            if start.elapsed() > PATIENCE {
                let at = self.eval(b, "location.href");
                let said = self.eval(b, "document.getElementById('updated')?.textContent ?? null");
                panic!("waited {PATIENCE:?} in the browser for {what} (`{expr}`); at {at}, the page says {said}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text` into the element `selector` finds, as keyboard input would.
    pub fn type_into(&self, b: &mut Browser, selector: &str, text: &str) {
        let focused = self.eval(b, &format!("(() => {{ const e = document.querySelector({selector:?}); e.focus(); e.select?.(); return document.activeElement === e; }})()"));
        assert_eq!(focused, json!(true), "cannot focus {selector}");
        b.call(Some(&self.session), "Input.insertText", json!({"text": text})).unwrap();
    }

    /// A PNG of the page, beyond the window when it is longer (up to `max_height` pixels).
    pub fn screenshot(&self, b: &mut Browser, max_height: f64) -> Vec<u8> {
        use base64::Engine;
        let m = b.call(Some(&self.session), "Page.getLayoutMetrics", json!({})).unwrap();
        let size = &m["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1360.0);
        let height = size["height"].as_f64().unwrap_or(900.0).min(max_height);
        let r = b
            .call(
                Some(&self.session),
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .unwrap();
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap_or("")).expect("base64 PNG")
    }
}
