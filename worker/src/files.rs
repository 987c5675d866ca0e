//! Answers workspace queries about the sessions this worker owns (see [`shared::files`]): one
//! subscription per worker, `{ns}.wsq.{worker_id}.*`. A query about a session whose lease this
//! worker does not hold is answered [`NOT_OWNER`] (the gateway reads the owner again).
//!
//! Files are read and written from the host side, never through a symlink: a path whose any
//! component is a symlink is refused (the agent could point one anywhere). `git status` runs in
//! the sandbox, since a repository's own configuration can make git run commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use shared::files::{FilesReply, FilesRequest, NOT_OWNER, UploadFile};
use shared::id::SessionId;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::Ctx;

/// Longest a `git status` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs until `cancel` fires.
pub(crate) async fn serve(ctx: Ctx, cancel: CancellationToken) {
    let subject = ctx.store.names().files_subjects(ctx.worker_id.as_str());
    let mut sub = match ctx.nats.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to workspace queries; the UI's file views fail");
            cancel.cancelled().await;
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => { cancel.cancelled().await; return; }
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let Some(reply_to) = msg.reply.clone() else {
                return;
            };
            let sid = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| SessionId::parse(s).ok());
            let span = info_span!("files", session_id = sid.as_ref().map(|s| s.as_str()));
            let reply = async {
                let Some(sid) = sid else {
                    return FilesReply::error(400, "invalid conversation id");
                };
                if !ctx.leases.holds(&sid) {
                    return FilesReply::error(
                        NOT_OWNER,
                        "this worker does not run the conversation",
                    );
                }
                let headers = msg.headers.clone().unwrap_or_default();
                let payload = match ctx.store.unpack(&headers, msg.payload.clone()).await {
                    Ok(p) => p,
                    Err(e) => return FilesReply::error(503, format!("request unreadable: {e}")),
                };
                // Read once: a payload stored out of line (a large upload) goes now.
                if let Err(e) = ctx.store.delete_payload_blob(&headers).await {
                    warn!(error = %e, "workspace query blob not deleted");
                }
                match serde_json::from_slice::<FilesRequest>(&payload) {
                    Ok(req) => answer(&ctx, &sid, req).await,
                    Err(e) => FilesReply::error(400, format!("invalid workspace query: {e}")),
                }
            }
            .instrument(span)
            .await;
            metrics::counter!("oh_worker_files_queries_total", "status" => reply.status.to_string())
                .increment(1);
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = ctx.nats.publish(reply_to, Bytes::from(body)).await {
                warn!(error = %e, "workspace query answer not sent");
            }
        });
    }
}

async fn answer(ctx: &Ctx, sid: &SessionId, req: FilesRequest) -> FilesReply {
    let root = ctx.args.workspace_root.join(sid.as_str());
    match req {
        FilesRequest::List { path } => list(&root, path.as_deref()),
        FilesRequest::Read { file } => read(&root, &file),
        FilesRequest::Upload { files } => upload(ctx, sid, &root, files),
        FilesRequest::GitChanges => git_changes(ctx, &root).await,
        FilesRequest::Microagents => microagents(ctx, &root),
    }
}

/// `root` joined with `path`'s parts, if no part is a symlink (missing parts are fine).
fn resolve(root: &Path, path: &str) -> Result<PathBuf, FilesReply> {
    let parts =
        shared::files::relative_parts(path).map_err(|e| FilesReply::error(400, e.to_string()))?;
    let mut p = root.to_path_buf();
    for part in parts {
        p.push(part);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(FilesReply::error(
                400,
                format!("{path}: a symbolic link is not followed"),
            ));
        }
    }
    Ok(p)
}

fn list(root: &Path, path: Option<&str>) -> FilesReply {
    let dir = match resolve(root, path.unwrap_or_default()) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return FilesReply::ok(json!([])); // as OpenHands: a missing folder lists nothing
    };
    let entries = entries.filter_map(Result::ok).filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let is_dir = e.file_type().ok()?.is_dir();
        Some((name, is_dir))
    });
    FilesReply::ok(json!(shared::files::listing(path, entries)))
}

fn read(root: &Path, file: &str) -> FilesReply {
    let p = match resolve(root, file) {
        Ok(p) => p,
        Err(e) => return e,
    };
    match std::fs::metadata(&p) {
        Ok(m) if !m.is_file() => return FilesReply::error(400, format!("{file} is not a file")),
        Ok(m) if m.len() > shared::files::MAX_READ_BYTES => {
            return FilesReply::error(
                413,
                format!("{file} holds {} bytes; at most 10 MiB are shown", m.len()),
            );
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return FilesReply::error(404, format!("File not found: {file}"));
        }
        Err(e) => return FilesReply::error(500, format!("Error opening file: {e}")),
    }
    match std::fs::read(&p) {
        Ok(bytes) => match shared::files::text_of(&bytes) {
            Some(text) => FilesReply::ok(json!({ "code": text })),
            None => FilesReply::error(415, format!("Unable to open binary file: {file}")),
        },
        Err(e) => FilesReply::error(500, format!("Error opening file: {e}")),
    }
}

fn upload(ctx: &Ctx, sid: &SessionId, root: &Path, files: Vec<UploadFile>) -> FilesReply {
    let shown_root = crate::runtime::RuntimeConfig::new(ctx.args.workspace_root.clone())
        .with_sandbox(ctx.sandbox.clone())
        .agent_workspace(sid);
    if let Err(e) = ensure_dir(ctx, root) {
        return FilesReply::error(500, format!("workspace not writable: {e}"));
    }
    let (mut uploaded, mut skipped) = (Vec::new(), Vec::new());
    for f in files {
        let skip = |reason: String| json!({"name": f.name, "reason": reason});
        let name_ok = !f.name.is_empty()
            && f.name.len() <= 255
            && !f.name.contains(['/', '\0'])
            && f.name != "."
            && f.name != "..";
        if !name_ok {
            skipped.push(skip("invalid file name".into()));
            continue;
        }
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&f.content_b64) else {
            skipped.push(skip("content is not base64".into()));
            continue;
        };
        let target = root.join(&f.name);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if !m.is_file() => {
                skipped.push(skip("a folder or link of that name exists".into()));
                continue;
            }
            _ => {}
        }
        let written = std::fs::write(&target, &bytes).and_then(|()| {
            if let Some(sb) = &ctx.sandbox {
                sb.hand_over(&target)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => uploaded.push(format!("{shown_root}/{}", f.name)),
            Err(e) => skipped.push(skip(format!("not written: {e}"))),
        }
    }
    FilesReply::ok(json!({"uploaded_files": uploaded, "skipped_files": skipped}))
}

/// Creates the session's workspace folder if the session has not made it yet.
fn ensure_dir(ctx: &Ctx, root: &Path) -> std::io::Result<()> {
    if root.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(root)?;
    if let Some(sb) = &ctx.sandbox {
        sb.hand_over(root)?;
    }
    Ok(())
}

async fn git_changes(ctx: &Ctx, root: &Path) -> FilesReply {
    if !root.join(".git").is_dir() {
        return FilesReply::error(404, "Not a git repository");
    }
    let args = [
        "git",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "safe.directory=*",
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
    ];
    let out = match &ctx.sandbox {
        Some(sb) => sb.run_once("git", root, &args, GIT_TIMEOUT).await,
        None => {
            // No sandbox (OH_SANDBOX=off): agent code already runs as this process.
            let mut cmd = tokio::process::Command::new("git");
            cmd.args(&args[1..])
                .current_dir(root)
                .env_clear()
                .env("PATH", crate::runtime::sandbox::PATH)
                .env("HOME", "/tmp")
                .kill_on_drop(true);
            tokio::time::timeout(GIT_TIMEOUT, cmd.output())
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("git status timed out")))
        }
    };
    match out {
        Ok(o) if o.status.success() => FilesReply::ok(Value::Array(porcelain_changes(&o.stdout))),
        Ok(o) => FilesReply::error(
            500,
            format!(
                "Error getting changes: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => FilesReply::error(500, format!("Error getting changes: {e}")),
    }
}

/// `git status --porcelain=v1 -z` as OpenHands reports changes: `M`, `A` (also untracked and
/// copies), `D`, `U` (conflicts); a rename is a `D` of the old path and an `A` of the new;
/// sorted by path.
fn porcelain_changes(out: &[u8]) -> Vec<Value> {
    let mut changes: Vec<(String, &str)> = Vec::new();
    let mut records = out.split(|b| *b == 0).filter(|r| !r.is_empty());
    while let Some(rec) = records.next() {
        if rec.len() < 4 {
            continue;
        }
        let (xy, path) = (&rec[..2], String::from_utf8_lossy(&rec[3..]).into_owned());
        let status = match xy {
            b"??" => "A",
            _ if xy.contains(&b'U') || xy == b"AA" || xy == b"DD" => "U",
            _ if xy[0] == b'R' => {
                if let Some(old) = records.next() {
                    changes.push((String::from_utf8_lossy(old).into_owned(), "D"));
                }
                "A"
            }
            _ if xy[0] == b'C' => {
                records.next();
                "A"
            }
            _ if xy.contains(&b'D') => "D",
            _ if xy.contains(&b'A') => "A",
            _ => "M",
        };
        changes.push((path, status));
    }
    changes.sort();
    changes
        .into_iter()
        .map(|(path, status)| json!({"status": status, "path": path}))
        .collect()
}

fn microagents(ctx: &Ctx, root: &Path) -> FilesReply {
    let mut out = Vec::new();
    if let Some(content) = crate::memory::workspace_instructions(root) {
        out.push(json!({"name": "repo", "type": "repo", "content": content,
            "triggers": [], "inputs": [], "tools": []}));
    }
    for k in ctx.knowledge.iter() {
        out.push(
            json!({"name": k.name, "type": "knowledge", "content": k.content,
            "triggers": k.triggers, "inputs": [], "tools": []}),
        );
    }
    FilesReply::ok(json!({ "microagents": out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_status_is_reported_as_openhands_does() {
        let out =
            b" M src/a.rs\0?? new.txt\0R  b2.txt\0b.txt\0D  gone.txt\0UU both.txt\0A  added.rs\0";
        let got: Vec<(String, String)> = porcelain_changes(out)
            .iter()
            .map(|v| {
                (
                    v["path"].as_str().unwrap_or_default().to_owned(),
                    v["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("added.rs", "A"),
            ("b.txt", "D"),
            ("b2.txt", "A"),
            ("both.txt", "U"),
            ("gone.txt", "D"),
            ("new.txt", "A"),
            ("src/a.rs", "M"),
        ]
        .iter()
        .map(|(p, s)| ((*p).to_owned(), (*s).to_owned()))
        .collect();
        assert_eq!(got, want);
    }
}
