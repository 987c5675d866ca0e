//! The official JavaScript `socket.io-client` (what the OpenHands frontend uses), run with Node.
//!
//! `tests/js/` holds a `package.json` depending on `socket.io-client` and `converse.mjs`, a
//! script that plays one conversation turn (see its header). [`ensure_js_client`] runs
//! `npm install --no-audit --no-fund` there when `node_modules/socket.io-client` is missing, once
//! per process and under a file lock (so parallel test binaries don't install concurrently).
//! [`run_js_converse`] runs the script and returns the `oh_event`s it received.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;

/// `tests/js` in the workspace.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Makes sure `socket.io-client` is installed under `tests/js` and returns that directory.
/// Panics with a clear message if `node` or `npm` are missing or the install fails.
pub fn ensure_js_client() -> PathBuf {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match INSTALLED.get_or_init(install) {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn tool_version(tool: &str) -> Result<String, String> {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Ok(out) => Err(format!(
            "`{tool} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!(
            "`{tool}` not found ({e}); install Node.js >= 18 with npm (Debian: `apt-get install nodejs npm`)"
        )),
    }
}

fn install() -> Result<PathBuf, String> {
    npm_install(&js_dir(), "socket.io-client", &[])
}

/// Runs `npm install --no-audit --no-fund` in `dir` (with `env` added) unless
/// `node_modules/<package>` is already there; under a file lock shared by every test process,
/// so parallel test binaries never install at the same time. Returns `dir`.
pub(crate) fn npm_install(
    dir: &Path,
    package: &str,
    env: &[(&str, &str)],
) -> Result<PathBuf, String> {
    tool_version("node")?;
    let marker = dir.join("node_modules").join(package).join("package.json");
    // Cross-process lock: cargo test binaries or nextest processes may run at the same time.
    let lock_path = std::env::temp_dir().join("oh-tests-js-install.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open lock file {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    if marker.is_file() {
        return Ok(dir.to_owned());
    }
    tool_version("npm")?;
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run npm install in {}: {e}", dir.display()))?;
    if !out.status.success() || !marker.is_file() {
        return Err(format!(
            "`npm install` in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    drop(lock);
    Ok(dir.to_owned())
}

/// Runs `converse.mjs`: connect to `base_url` for `conversation_id` (optionally with
/// `Authorization: Bearer <token>`), send `text` as a user message and wait for the agent's
/// `echo: <text>`. Returns every `oh_event` received, in order. `Err` describes a
/// `connect_error` (its JSON line), a timeout or disconnect (with the events so far), or a
/// crash (with stderr).
pub async fn run_js_converse(
    base_url: &str,
    conversation_id: &str,
    text: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Value>, String> {
    run_js_converse_over(base_url, conversation_id, text, token, timeout, "websocket").await
}

/// [`run_js_converse`] over the given socket.io-client `transports` (comma-separated, e.g.
/// `polling` for long-polling only).
pub async fn run_js_converse_over(
    base_url: &str,
    conversation_id: &str,
    text: &str,
    token: Option<&str>,
    timeout: Duration,
    transports: &str,
) -> Result<Vec<Value>, String> {
    let dir = tokio::task::spawn_blocking(ensure_js_client)
        .await
        .map_err(|e| format!("installing socket.io-client: {e}"))?;
    let timeout_ms = timeout.as_millis().to_string();
    let child = tokio::process::Command::new("node")
        .arg(dir.join("converse.mjs"))
        .args([
            base_url,
            conversation_id,
            text,
            token.unwrap_or(""),
            &timeout_ms,
        ])
        .current_dir(&dir)
        .env("OH_JS_TRANSPORTS", transports)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout + Duration::from_secs(20), child)
        .await
        .map_err(|_| format!("node converse.mjs did not exit within {timeout:?} + 20 s"))?
        .map_err(|e| format!("cannot run node: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let what = match out.status.code() {
        Some(0) => {
            return stdout
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l)
                        .map_err(|e| format!("converse.mjs printed a non-JSON line ({e}): {l}"))
                })
                .collect();
        }
        Some(3) => "connect_error",
        Some(4) => "timeout",
        Some(5) => "disconnected before the echo",
        _ => "failed",
    };
    Err(format!(
        "converse.mjs {what} ({}); stdout:\n{stdout}stderr:\n{stderr}",
        out.status
    ))
}
