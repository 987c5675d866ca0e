//! Workspace queries: what the gateway asks a session's owning worker about its files (OpenHands'
//! `list-files`, `select-file`, `upload-files`, `git/changes`, `microagents`), and the listing
//! rules both sides share (the gateway lists from the latest snapshot when no worker runs the
//! session).
//!
//! A query is a core-NATS request on `{ns}.wsq.{worker_id}.{sid}` ([`crate::names::Names`])
//! with a JSON [`FilesRequest`] (an upload's payload may be stored out of line, header
//! `Oh-Blob`, as actions are). Only the worker holding the session's lease answers, with a
//! [`FilesReply`]: the HTTP status and OpenHands-shaped body the gateway returns as they are.
//! A worker that does not hold the lease answers [`NOT_OWNER`]; the gateway then reads the
//! owner again.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Status of the reply of a worker that does not hold the session's lease (any more).
pub const NOT_OWNER: u16 = 421;

/// Paths never listed (as OpenHands' `FILES_TO_IGNORE`).
pub const IGNORED: &[&str] = &[
    ".git/",
    ".DS_Store",
    "node_modules/",
    "__pycache__/",
    "lost+found/",
    ".vscode/",
];

/// Most bytes of a file `select-file` returns.
pub const MAX_READ_BYTES: u64 = 10 * 1024 * 1024;

/// A question about a session's workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FilesRequest {
    /// The entries of a folder (the workspace itself when `path` is unset).
    List {
        /// Folder, relative to the workspace (`/workspace/...` accepted).
        path: Option<String>,
    },
    /// A text file's content.
    Read {
        /// File, relative to the workspace (`/workspace/...` accepted).
        file: String,
    },
    /// Files to write at the workspace's top level.
    Upload {
        /// The files.
        files: Vec<UploadFile>,
    },
    /// `git status` of the workspace, as OpenHands reports it.
    GitChanges,
    /// The microagents the session's agent has: the workspace's instructions and the
    /// server's knowledge files.
    Microagents,
}

/// One uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadFile {
    /// Its name (no folder).
    pub name: String,
    /// Its bytes, base64.
    pub content_b64: String,
}

/// The answer: HTTP status and body, as the gateway returns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

impl FilesReply {
    /// A 200 with `body`.
    pub fn ok(body: Value) -> Self {
        FilesReply { status: 200, body }
    }

    /// An error as OpenHands words its workspace errors: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        FilesReply {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }
}

/// Why a requested path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the path must be relative to the workspace and stay inside it (no `..`)")]
pub struct OutsideWorkspace;

/// A requested path as components relative to the workspace: `/workspace/a/b`, `a/b`, `./a/b/`
/// are `["a", "b"]`; empty for the workspace itself.
///
/// # Errors
/// [`OutsideWorkspace`] for `..`, another absolute path, or a NUL byte.
pub fn relative_parts(path: &str) -> Result<Vec<String>, OutsideWorkspace> {
    let rest = match path.strip_prefix("/workspace") {
        Some(r) if r.is_empty() || r.starts_with('/') => r,
        _ if path.starts_with('/') => return Err(OutsideWorkspace),
        _ => path,
    };
    let mut out = Vec::new();
    for part in rest.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(OutsideWorkspace),
            p if p.contains('\0') => return Err(OutsideWorkspace),
            p => out.push(p.to_owned()),
        }
    }
    Ok(out)
}

/// A folder's listing as OpenHands answers it: folders (with a trailing `/`) first, then
/// files, each sorted case-insensitively, the ignored names left out, and each entry prefixed
/// with the requested `path` when one was given.
pub fn listing(
    path: Option<&str>,
    entries: impl IntoIterator<Item = (String, bool)>,
) -> Vec<String> {
    let (mut dirs, mut files): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    for (name, is_dir) in entries {
        let shown = if is_dir { format!("{name}/") } else { name };
        if IGNORED.contains(&shown.as_str()) {
            continue;
        }
        if is_dir {
            dirs.push(shown);
        } else {
            files.push(shown);
        }
    }
    for v in [&mut dirs, &mut files] {
        v.sort_by_key(|n| n.to_lowercase());
    }
    let prefix = path
        .map(|p| p.trim_end_matches('/'))
        .filter(|p| !p.is_empty());
    dirs.into_iter()
        .chain(files)
        .map(|n| match prefix {
            Some(p) => format!("{p}/{n}"),
            None => n,
        })
        .collect()
}

/// The text of a file for `select-file`, or `None` if it is binary (not UTF-8, or has NUL).
pub fn text_of(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_workspace() {
        assert_eq!(relative_parts("/workspace/a/b/").unwrap(), ["a", "b"]);
        assert_eq!(relative_parts("./a//b").unwrap(), ["a", "b"]);
        assert!(relative_parts("/workspace").unwrap().is_empty());
        assert!(relative_parts("").unwrap().is_empty());
        for bad in ["../x", "a/../../x", "/etc/passwd", "/workspacex/a", "a\0b"] {
            assert_eq!(relative_parts(bad), Err(OutsideWorkspace), "{bad}");
        }
    }

    #[test]
    fn listings_put_folders_first_sorted_without_ignored_names() {
        let got = listing(
            None,
            [
                ("b.txt".to_owned(), false),
                ("Zed".to_owned(), true),
                ("a.md".to_owned(), false),
                (".git".to_owned(), true),
                ("node_modules".to_owned(), true),
                ("alpha".to_owned(), true),
                (".DS_Store".to_owned(), false),
            ],
        );
        assert_eq!(got, ["alpha/", "Zed/", "a.md", "b.txt"]);
        let got = listing(Some("src/"), [("m.rs".to_owned(), false)]);
        assert_eq!(got, ["src/m.rs"]);
    }

    #[test]
    fn binary_files_have_no_text() {
        assert_eq!(text_of(b"fn main() {}\n"), Some("fn main() {}\n"));
        assert_eq!(text_of(b"a\0b"), None);
        assert_eq!(text_of(&[0xff, 0xfe]), None);
    }
}
