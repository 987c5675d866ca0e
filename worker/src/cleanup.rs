//! Removes the workspace of a deleted conversation. The gateway that deletes it announces it
//! on `{ns}.gone.{sid}` (core NATS) after stopping the session and purging its log; every
//! worker removes `<OH_WORKSPACE_ROOT>/<sid>` (and its snapshot index) if it has one. At most once: a worker that was
//! down at that moment keeps the folder (no conversation refers to it any more).

use futures::StreamExt;
use shared::id::SessionId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;

/// Runs until `cancel` fires.
pub(crate) async fn workspace_gc(ctx: Ctx, cancel: CancellationToken) {
    let names = ctx.store.names();
    let mut sub = match ctx.nats.subscribe(names.deleted_subjects()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to deletions; workspaces of deleted conversations stay");
            // A core loop that ends stops the worker: wait for shutdown instead.
            cancel.cancelled().await;
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => {
                    cancel.cancelled().await;
                    return;
                }
            },
        };
        // The subject's last token is the conversation id; anything else is ignored.
        let Some(sid) = msg
            .subject
            .rsplit('.')
            .next()
            .and_then(|s| SessionId::parse(s).ok())
        else {
            continue;
        };
        let _ = std::fs::remove_file(crate::workspace::index_path(&ctx.args.workspace_root, &sid));
        let dir = ctx.args.workspace_root.join(sid.as_str());
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {
                metrics::counter!("oh_worker_workspaces_removed_total").increment(1);
                info!(session_id = %sid, "workspace of a deleted conversation removed");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(session_id = %sid, error = %e, "workspace not removed"),
        }
    }
}
