//! Headless Chromium driven by Node scripts, for tests of the web UI.
//!
//! `tests/browser/` holds a `package.json` depending on `playwright-core` only (an exact
//! version, with its `package-lock.json`) and the scripts (e.g. `builtin-page.mjs`, see its
//! header). [`ensure_browser_driver`] installs it like [`crate::js`] does its client (`npm
//! install` once per process, under the same file lock), with `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`:
//! the browser is the system's Chromium (Debian's `/usr/bin/chromium`, or `OH_CHROMIUM`),
//! never a download. [`run_script`] runs one script and returns its exit status and output.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// `tests/browser` in the workspace.
pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// The Chromium to drive: `OH_CHROMIUM` if set, else `chromium` on `PATH` or
/// `/usr/bin/chromium`.
///
/// # Errors
/// What to install when there is none.
pub fn chromium_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("OH_CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("OH_CHROMIUM={} is not a file", p.display()))
        };
    }
    crate::proc::find_system_bin("chromium", &["/usr/bin/chromium"])
        .map_err(|e| format!("{e} (`deploy/setup.sh` installs it)"))
}

/// Makes sure `playwright-core` is installed under `tests/browser` and returns that
/// directory. Panics with a clear message if `node` or `npm` are missing or the install fails.
pub fn ensure_browser_driver() -> PathBuf {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        crate::js::npm_install(
            &browser_dir(),
            "playwright-core",
            &[("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")],
        )
    });
    match installed {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// What a script did.
#[derive(Debug)]
pub struct ScriptRun {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout and stderr, for the test's output.
    pub output: String,
    /// How long it ran.
    pub took: Duration,
}

/// Runs `node tests/browser/<script> <args>...` with the Chromium of [`chromium_path`] in
/// `OH_CHROMIUM`; kills it after `timeout`.
///
/// # Errors
/// No Chromium, node that cannot be run, or the timeout (with what is known).
pub async fn run_script(
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<ScriptRun, String> {
    let chromium = chromium_path()?;
    let dir = tokio::task::spawn_blocking(ensure_browser_driver)
        .await
        .map_err(|e| format!("installing playwright-core: {e}"))?;
    let started = std::time::Instant::now();
    let child = tokio::process::Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .env("OH_CHROMIUM", &chromium)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| format!("node {script} did not exit within {timeout:?}"))?
        .map_err(|e| format!("cannot run node: {e}"))?;
    Ok(ScriptRun {
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took: started.elapsed(),
    })
}
