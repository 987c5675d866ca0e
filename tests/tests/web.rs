//! The web UI end to end: the gateway's built-in page driven in headless Chromium (Debian's,
//! through `playwright-core`: `tests/browser/builtin-page.mjs`) against a real deployment, and
//! a built single-page app served from `OH_WEB_ROOT` beside the API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tests::cluster::{Cluster, ClusterOpts};

/// Everything the browser script does, with room for a loaded 2-core machine.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

async fn get(url: &str) -> reqwest::Response {
    tests::http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Runs `builtin-page.mjs` against a fresh deployment (one gateway, one echo worker), with
/// `OH_AUTH_TOKENS=<token>=alice` when a token is given; asserts it passed.
async fn drive_built_in_page(token: Option<&str>) {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        auth_tokens: token.map(|t| format!("{t}=alice")),
        ..ClusterOpts::default()
    })
    .await;
    let res = get(&format!("{}/", c.url(0))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&res, "cache-control"), "no-cache");
    assert!(res.text().await.unwrap().contains("OpenHands sessions"));

    let base = c.url(0);
    let args: Vec<&str> = std::iter::once(base.as_str()).chain(token).collect();
    let run = tests::browser::run_script("builtin-page.mjs", &args, SCRIPT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    println!(
        "builtin-page.mjs ({:.1} s, exit {:?}):\n{}",
        run.took.as_secs_f64(),
        run.code,
        run.output
    );
    assert_eq!(
        run.code,
        Some(0),
        "the browser script failed:\n{}{}",
        run.output,
        c.logs()
    );
}

/// A user in Chromium on the built-in page (single-user mode): creates a conversation with a
/// message and sees the echo, stops it and sees `stopped`, reloads and sees the history again
/// (each event once), resumes, survives a dropped socket (reconnecting after the last id
/// seen), sends a second message and sees its echo, and sees a refused socket and a failed
/// REST call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_page_converses_stops_reloads_and_resumes_in_chromium() {
    drive_built_in_page(None).await;
}

/// The same with `OH_AUTH_TOKENS`: the page shows the 401 until the user types a token, then
/// sends it as `Authorization: Bearer` on REST and in the Socket.IO connect packet, and keeps
/// it across the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_page_sends_the_token_to_rest_and_to_the_socket() {
    drive_built_in_page(Some("tok-alice")).await;
}

/// `OH_WEB_ROOT`: the app's files are served, any other path gets its `index.html` (client-side
/// routes), and the gateway's own paths stay the gateway's: the API answers, an unknown API
/// path is a JSON 404, never the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_root_serves_the_app_and_its_routes_but_never_the_api_paths() {
    const INDEX: &str = "<!doctype html><title>app</title><div id=app></div>";
    const APP_JS: &str = "document.getElementById('app').textContent = 'app';\n";
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("index.html"), INDEX).unwrap();
    std::fs::write(root.path().join("app.js"), APP_JS).unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 0,
        gateway_env: vec![("OH_WEB_ROOT", root.path().display().to_string())],
        ..ClusterOpts::default()
    })
    .await;
    let base = c.url(0);

    for path in ["/", "/conversations/x", "/conversations/abc/deep/route"] {
        let res = get(&format!("{base}{path}")).await;
        assert_eq!(res.status(), 200, "{path}");
        assert!(
            header(&res, "content-type").starts_with("text/html"),
            "{path}"
        );
        assert_eq!(header(&res, "cache-control"), "no-cache", "{path}");
        assert_eq!(res.text().await.unwrap(), INDEX, "{path}");
    }

    let res = get(&format!("{base}/app.js")).await;
    assert_eq!(res.status(), 200);
    assert!(
        header(&res, "content-type").contains("javascript"),
        "{:?}",
        res.headers()
    );
    assert_eq!(res.text().await.unwrap(), APP_JS);

    for path in ["/api/nope", "/api", "/api/conversations/x/nope"] {
        let res = get(&format!("{base}{path}")).await;
        assert_eq!(res.status(), 404, "{path}");
        let body = res.text().await.unwrap();
        assert_ne!(body, INDEX, "{path}");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert_eq!(json["detail"], "Not Found", "{path}");
    }

    // The API, health and metrics are untouched.
    let (code, list) = c.get(0, "/api/conversations", None).await;
    assert_eq!(code, 200, "{list}");
    assert!(list["results"].is_array(), "{list}");
    let res = get(&format!("{base}/healthz")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");

    // Only reads are served from the folder.
    let res = tests::http_client()
        .post(format!("{base}/conversations/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
}

/// A web root that is not a folder with an `index.html` stops the gateway at startup, with a
/// message naming `OH_WEB_ROOT`.
#[tokio::test]
async fn a_web_root_without_index_html_is_refused_at_startup() {
    let empty = tempfile::tempdir().unwrap();
    let file = empty.path().join("index.txt");
    std::fs::write(&file, "not a folder").unwrap();
    for (root, why) in [
        (empty.path().to_owned(), "no index.html"),
        (file, "not a folder"),
    ] {
        let out = tokio::process::Command::new(tests::proc::bin_path("gateway"))
            .env("OH_WEB_ROOT", &root)
            .env(
                "OH_GATEWAY_ADDR",
                format!("127.0.0.1:{}", tests::proc::free_port()),
            )
            // Nothing listens there: the check must come before any connection.
            .env("OH_NATS_URL", "nats://127.0.0.1:1")
            .env("OH_REDIS_URL", "redis://127.0.0.1:1")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("the gateway exits")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {stderr}", root.display());
        assert!(
            stderr.contains("OH_WEB_ROOT") && stderr.contains(why),
            "{}: {stderr}",
            root.display()
        );
    }
}
