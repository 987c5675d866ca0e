//! The file tools of a session (`str_replace_editor`: view, create, str_replace, insert,
//! undo_edit), with OpenHands' semantics and messages, confined to the workspace.
//!
//! **Confinement:** a path may be absolute or relative to the workspace. It is normalized
//! lexically (`.` and `..` removed), then its longest existing ancestor is resolved through
//! symlinks; the result must lie inside the (canonical) workspace, and the first missing
//! component must not be a dangling symlink. So `../x`, `/etc/passwd` and a symlink to `/`
//! are refused. This confines the *file tools* only: the shell is not sandboxed, and a process
//! of the session racing to swap a checked directory for a symlink is not defended against.
//!
//! **Limits:** files larger than `max_file_bytes` are neither read nor written; only regular
//! files are opened (a FIFO would block); views are cut to `max_output_chars`. Edits require
//! UTF-8 text; views of other bytes show replacement characters.
//!
//! **History:** each create, str_replace, insert and undo-able change pushes the file's
//! previous content (or "did not exist") on a per-file stack of at most [`HISTORY_DEPTH`]
//! entries; `undo_edit` pops it. History lives in memory and is lost with the runtime.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use tokio::io::AsyncReadExt;

/// Undo steps kept per file.
pub(crate) const HISTORY_DEPTH: usize = 10;
/// Entries listed by a directory view before it is cut short.
const MAX_DIR_ENTRIES: usize = 1_000;
/// Lines of context shown around an edit.
const SNIPPET_LINES: usize = 4;
/// Appended when a file view is cut to the size limit (OpenHands' note).
const CLIPPED_NOTE: &str = "<response clipped><NOTE>To save on context only part of this file has been shown to you. You should retry this tool after you have searched inside the file with `grep -n` in order to find the line numbers of what you are looking for.</NOTE>";

/// One `str_replace_editor` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EditCommand {
    /// Show a file with line numbers (optionally lines `start..=end`, 1-based, `end == -1`
    /// meaning the last line), or list a directory two levels deep.
    View {
        path: String,
        view_range: Option<(i64, i64)>,
    },
    /// Create a new file (parents included); refuses to overwrite.
    Create { path: String, file_text: String },
    /// Replace the only occurrence of `old_str` by `new_str`.
    StrReplace {
        path: String,
        old_str: String,
        new_str: String,
    },
    /// Insert `new_str` after line `insert_line` (0: at the top).
    Insert {
        path: String,
        insert_line: i64,
        new_str: String,
    },
    /// Restore the content from before the last edit of `path`.
    UndoEdit { path: String },
}

impl EditCommand {
    /// The `path` argument as given.
    pub(crate) fn path(&self) -> &str {
        match self {
            Self::View { path, .. }
            | Self::Create { path, .. }
            | Self::StrReplace { path, .. }
            | Self::Insert { path, .. }
            | Self::UndoEdit { path } => path,
        }
    }
}

/// The result of a successful edit command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EditOutput {
    /// What the model sees (OpenHands' wording: `cat -n` views and snippets).
    pub content: String,
    /// The absolute path acted on (inside the canonical workspace).
    pub path: String,
    /// The file existed before the command.
    pub prev_exist: bool,
    /// Content before the change (`None` for views, and when the file did not exist).
    pub old_content: Option<String>,
    /// Content after the change (`None` for views, and when undo removed the file).
    pub new_content: Option<String>,
}

/// Why an edit command was refused or failed. The message is written for the model.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EditError {
    #[error("Invalid `path` parameter: the path is empty.")]
    EmptyPath,
    #[error(
        "Invalid `path` parameter: {path}. Access is restricted to the workspace {workspace}; paths that leave it (through `..`, a symlink, or an absolute path elsewhere) are refused."
    )]
    OutsideWorkspace { path: String, workspace: String },
    #[error(
        "Invalid `path` parameter: {path}. The path {path} does not exist. Please provide a valid path."
    )]
    NotFound { path: String },
    #[error(
        "Invalid `path` parameter: {path}. File already exists at: {path}. Cannot overwrite files using command `create`."
    )]
    AlreadyExists { path: String },
    #[error(
        "Invalid `path` parameter: {path}. The path {path} is a directory and only the `view` command can be used on directories."
    )]
    IsDirectory { path: String },
    #[error("Invalid `path` parameter: {path}. It is not a regular file or directory.")]
    NotRegular { path: String },
    #[error("The `view_range` parameter is not allowed when `path` points to a directory.")]
    ViewRangeOnDirectory,
    #[error("Invalid `view_range` parameter: [{start}, {end}]. {reason}")]
    InvalidViewRange {
        start: i64,
        end: i64,
        reason: String,
    },
    #[error(
        "Invalid `insert_line` parameter: {line}. It should be within the range of lines of the file: [0, {lines}]"
    )]
    InvalidInsertLine { line: i64, lines: usize },
    #[error("No replacement was performed, old_str `{old_str}` did not appear verbatim in {path}.")]
    NoMatch { old_str: String, path: String },
    #[error(
        "No replacement was performed. Multiple occurrences of old_str `{old_str}` in lines {lines:?}. Please ensure it is unique."
    )]
    MultipleMatches { old_str: String, lines: Vec<usize> },
    #[error("No replacement was performed. `old_str` must not be empty.")]
    EmptyOldStr,
    #[error("No replacement was performed. `new_str` and `old_str` must be different.")]
    SameStrings,
    #[error("No edit history found for {path}.")]
    NoHistory { path: String },
    #[error(
        "The file {path} is larger than {limit} bytes; use the shell (e.g. `grep -n`, `sed -n`) to work on it."
    )]
    TooLarge { path: String, limit: u64 },
    #[error("The file {path} is not UTF-8 text and cannot be edited with this tool.")]
    NotText { path: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// File tools of one session: the workspace, the limits, and the undo history.
#[derive(Debug)]
pub(crate) struct Editor {
    /// Canonical workspace directory.
    workspace: PathBuf,
    max_file_bytes: u64,
    max_output_chars: usize,
    /// Previous contents per file, newest last (`None`: the file did not exist).
    history: HashMap<PathBuf, Vec<Option<String>>>,
    /// The workspace as the agent's shell sees it (`/workspace` in a sandbox); paths in
    /// messages are shown under it.
    shown_root: PathBuf,
    /// Owner of what the tools create (the sandbox user), when it is not the worker.
    owner: Option<(u32, u32)>,
}

impl Editor {
    /// `workspace` must be canonical (no symlinks), as confinement compares against it.
    pub(crate) fn new(workspace: PathBuf, max_file_bytes: u64, max_output_chars: usize) -> Self {
        Self {
            shown_root: workspace.clone(),
            workspace,
            max_file_bytes,
            max_output_chars,
            history: HashMap::new(),
            owner: None,
        }
    }

    /// Shows paths under `shown_root` (the shell's view of the workspace) and gives what the
    /// tools create to `owner`, so the sandboxed shell can change it.
    pub(crate) fn sandboxed(mut self, shown_root: PathBuf, owner: Option<(u32, u32)>) -> Self {
        self.shown_root = shown_root;
        self.owner = owner;
        self
    }

    /// `path` (inside the workspace) as the agent sees it.
    fn show(&self, path: &Path) -> String {
        match path.strip_prefix(&self.workspace) {
            Ok(rel) if rel.as_os_str().is_empty() => self.shown_root.display().to_string(),
            Ok(rel) => self.shown_root.join(rel).display().to_string(),
            Err(_) => path.display().to_string(),
        }
    }

    /// Gives `path` and its folders up to the workspace to the sandbox user (if any).
    fn hand_over(&self, path: &Path) -> io::Result<()> {
        let Some((uid, gid)) = self.owner else {
            return Ok(());
        };
        let mut at = Some(path);
        while let Some(p) = at.filter(|p| p.starts_with(&self.workspace) && *p != self.workspace) {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
            at = p.parent();
        }
        Ok(())
    }

    /// Runs one command.
    ///
    /// # Errors
    /// [`EditError`]: the path is outside the workspace or unusable for this command, an
    /// argument is invalid (range, line, no unique match), a size limit, or I/O.
    pub(crate) async fn run(&mut self, cmd: &EditCommand) -> Result<EditOutput, EditError> {
        let path = self.resolve(cmd.path()).await?;
        let shown = self.show(&path);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&shown, e)),
        };
        let Some(meta) = meta else {
            return match cmd {
                EditCommand::Create { file_text, .. } => self.create(&path, shown, file_text).await,
                // A file deleted since its last edit: undo still applies (it re-creates it).
                EditCommand::UndoEdit { .. } if self.history.contains_key(&path) => {
                    self.undo(&path, shown, None).await
                }
                _ => Err(EditError::NotFound { path: shown }),
            };
        };
        if let EditCommand::Create { .. } = cmd {
            return Err(EditError::AlreadyExists { path: shown });
        }
        if meta.is_dir() {
            return match cmd {
                EditCommand::View {
                    view_range: None, ..
                } => self.view_dir(&path, shown).await,
                EditCommand::View { .. } => Err(EditError::ViewRangeOnDirectory),
                _ => Err(EditError::IsDirectory { path: shown }),
            };
        }
        if !meta.is_file() {
            return Err(EditError::NotRegular { path: shown });
        }
        let bytes = self.read(&path, &shown).await?;
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes).map_err(|_| EditError::NotText {
                path: shown.clone(),
            })
        };
        match cmd {
            EditCommand::View { view_range, .. } => {
                self.view_file(&String::from_utf8_lossy(&bytes), shown, *view_range)
            }
            EditCommand::StrReplace {
                old_str, new_str, ..
            } => {
                let text = text(bytes)?;
                self.str_replace(&path, shown, text, old_str, new_str).await
            }
            EditCommand::Insert {
                insert_line,
                new_str,
                ..
            } => {
                let text = text(bytes)?;
                self.insert(&path, shown, text, *insert_line, new_str).await
            }
            EditCommand::UndoEdit { .. } => {
                let text = text(bytes)?;
                self.undo(&path, shown, Some(text)).await
            }
            EditCommand::Create { .. } => Err(EditError::AlreadyExists { path: shown }),
        }
    }

    /// Maps a user path to an absolute path inside the workspace (see the module docs).
    async fn resolve(&self, raw: &str) -> Result<PathBuf, EditError> {
        if raw.trim().is_empty() {
            return Err(EditError::EmptyPath);
        }
        let outside = || EditError::OutsideWorkspace {
            path: raw.to_owned(),
            workspace: self.shown_root.display().to_string(),
        };
        if raw.contains('\0') {
            return Err(outside());
        }
        // The agent's view of the workspace (`/workspace` in a sandbox) is the workspace.
        let joined = match Path::new(raw).strip_prefix(&self.shown_root) {
            Ok(rel) if self.shown_root != self.workspace => self.workspace.join(rel),
            _ => self.workspace.join(raw),
        };
        let lexical = normalize(&joined);
        if !lexical.starts_with(&self.workspace) {
            return Err(outside());
        }
        // Resolve symlinks in the longest existing ancestor.
        let mut existing = lexical.as_path();
        let mut missing = Vec::new();
        let canonical = loop {
            match tokio::fs::canonicalize(existing).await {
                Ok(c) => break c,
                Err(_) => {
                    let (Some(parent), Some(name)) = (existing.parent(), existing.file_name())
                    else {
                        return Err(outside());
                    };
                    missing.push(name.to_owned());
                    existing = parent;
                }
            }
        };
        if !canonical.starts_with(&self.workspace) {
            return Err(outside());
        }
        let mut resolved = canonical;
        if let Some(first) = missing.last() {
            // It does not resolve; if it exists at all it is a dangling (or looping) symlink,
            // and writing through it could land anywhere.
            if tokio::fs::symlink_metadata(resolved.join(first))
                .await
                .is_ok()
            {
                return Err(outside());
            }
        }
        for name in missing.iter().rev() {
            resolved.push(name);
        }
        Ok(resolved)
    }

    async fn read(&self, path: &Path, shown: &str) -> Result<Vec<u8>, EditError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io_err(shown, e))?;
        let mut bytes = Vec::new();
        file.take(self.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| io_err(shown, e))?;
        if bytes.len() as u64 > self.max_file_bytes {
            return Err(self.too_large(shown));
        }
        Ok(bytes)
    }

    async fn write(&self, path: &Path, shown: &str, text: &str) -> Result<(), EditError> {
        if text.len() as u64 > self.max_file_bytes {
            return Err(self.too_large(shown));
        }
        tokio::fs::write(path, text)
            .await
            .map_err(|e| io_err(shown, e))?;
        self.hand_over(path).map_err(|e| io_err(shown, e))
    }

    fn too_large(&self, shown: &str) -> EditError {
        EditError::TooLarge {
            path: shown.to_owned(),
            limit: self.max_file_bytes,
        }
    }

    fn remember(&mut self, path: &Path, previous: Option<String>) {
        let stack = self.history.entry(path.to_owned()).or_default();
        stack.push(previous);
        if stack.len() > HISTORY_DEPTH {
            stack.remove(0);
        }
    }

    async fn view_dir(&self, path: &Path, shown: String) -> Result<EditOutput, EditError> {
        let mut lines = vec![format!("{shown}/")];
        let mut hidden = 0usize;
        let mut cut = false;
        let mut level = vec![path.to_owned()];
        for depth in 0..2 {
            let mut next = Vec::new();
            for dir in &level {
                let mut entries = Vec::new();
                let mut rd = match tokio::fs::read_dir(dir).await {
                    Ok(rd) => rd,
                    // An unreadable subdirectory is listed but not entered.
                    Err(_) if depth > 0 => continue,
                    Err(e) => return Err(io_err(&shown, e)),
                };
                while let Some(entry) = rd.next_entry().await.map_err(|e| io_err(&shown, e))? {
                    entries.push(entry);
                }
                entries.sort_by_key(tokio::fs::DirEntry::file_name);
                for entry in entries {
                    if entry.file_name().to_string_lossy().starts_with('.') {
                        if depth == 0 {
                            hidden += 1;
                        }
                        continue;
                    }
                    if lines.len() > MAX_DIR_ENTRIES {
                        cut = true;
                        break;
                    }
                    let p = entry.path();
                    // Symlinks are listed, never followed.
                    let is_dir = entry.file_type().await.is_ok_and(|t| t.is_dir());
                    lines.push(format!(
                        "{}{}",
                        self.show(&p),
                        if is_dir { "/" } else { "" }
                    ));
                    if is_dir {
                        next.push(p);
                    }
                }
            }
            level = next;
        }
        let mut content = format!(
            "Here's the files and directories up to 2 levels deep in {shown}, excluding hidden items:\n{}\n",
            lines.join("\n")
        );
        if cut {
            content.push_str(&format!(
                "[... listing cut after {MAX_DIR_ENTRIES} entries; use `ls` or `find` in the shell to see more ...]\n"
            ));
        }
        if hidden > 0 {
            content.push_str(&format!(
                "\n{hidden} hidden files/directories in this directory are excluded. You can use 'ls -la {shown}' to see them."
            ));
        }
        Ok(EditOutput {
            content,
            path: shown,
            prev_exist: true,
            old_content: None,
            new_content: None,
        })
    }

    fn view_file(
        &self,
        text: &str,
        shown: String,
        view_range: Option<(i64, i64)>,
    ) -> Result<EditOutput, EditError> {
        let lines: Vec<&str> = text.split('\n').collect();
        let n = lines.len() as i64;
        let (first, body) = match view_range {
            None => (1, lines.join("\n")),
            Some((start, end)) => {
                let bad = |reason: String| EditError::InvalidViewRange { start, end, reason };
                if start < 1 || start > n {
                    return Err(bad(format!(
                        "Its first element `{start}` should be within the range of lines of the file: [1, {n}]."
                    )));
                }
                if end != -1 && end > n {
                    return Err(bad(format!(
                        "Its second element `{end}` should be smaller than the number of lines in the file: `{n}`."
                    )));
                }
                if end != -1 && end < start {
                    return Err(bad(format!(
                        "Its second element `{end}` should be larger or equal than its first `{start}`."
                    )));
                }
                let last = if end == -1 { n } else { end };
                // Both bounds were checked to lie in 1..=n above.
                let (s, e) = (
                    usize::try_from(start - 1).unwrap_or(0),
                    usize::try_from(last).unwrap_or(0),
                );
                (start, lines[s..e].join("\n"))
            }
        };
        let numbered = number_lines(&body, first);
        let mut content = format!("Here's the result of running `cat -n` on {shown}:\n");
        if numbered.chars().count() > self.max_output_chars {
            let end = numbered
                .char_indices()
                .nth(self.max_output_chars)
                .map_or(numbered.len(), |(i, _)| i);
            content.push_str(&numbered[..end]);
            content.push_str(CLIPPED_NOTE);
        } else {
            content.push_str(&numbered);
        }
        content.push('\n');
        Ok(EditOutput {
            content,
            path: shown,
            prev_exist: true,
            old_content: None,
            new_content: None,
        })
    }

    async fn create(
        &mut self,
        path: &Path,
        shown: String,
        file_text: &str,
    ) -> Result<EditOutput, EditError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_err(&shown, e))?;
        }
        if file_text.len() as u64 > self.max_file_bytes {
            return Err(self.too_large(&shown));
        }
        // `create_new`: never overwrite, even if the file appeared since the check.
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => EditError::AlreadyExists {
                    path: shown.clone(),
                },
                _ => io_err(&shown, e),
            })?;
        tokio::io::AsyncWriteExt::write_all(&mut file, file_text.as_bytes())
            .await
            .map_err(|e| io_err(&shown, e))?;
        self.hand_over(path).map_err(|e| io_err(&shown, e))?;
        self.remember(path, None);
        Ok(EditOutput {
            content: format!("File created successfully at: {shown}"),
            path: shown,
            prev_exist: false,
            old_content: None,
            new_content: Some(file_text.to_owned()),
        })
    }

    async fn str_replace(
        &mut self,
        path: &Path,
        shown: String,
        text: String,
        old_str: &str,
        new_str: &str,
    ) -> Result<EditOutput, EditError> {
        if old_str.is_empty() {
            return Err(EditError::EmptyOldStr);
        }
        if old_str == new_str {
            return Err(EditError::SameStrings);
        }
        let starts: Vec<usize> = text.match_indices(old_str).map(|(i, _)| i).collect();
        let at = match starts.as_slice() {
            [] => {
                return Err(EditError::NoMatch {
                    old_str: old_str.to_owned(),
                    path: shown,
                });
            }
            [at] => *at,
            many => {
                let lines = many.iter().map(|&i| line_of(&text, i) + 1).collect();
                return Err(EditError::MultipleMatches {
                    old_str: old_str.to_owned(),
                    lines,
                });
            }
        };
        let new_text = format!("{}{new_str}{}", &text[..at], &text[at + old_str.len()..]);
        self.write(path, &shown, &new_text).await?;
        let line = line_of(&text, at);
        let snippet = snippet(
            &new_text,
            line.saturating_sub(SNIPPET_LINES),
            line + SNIPPET_LINES + new_str.matches('\n').count(),
        );
        let content = format!(
            "The file {shown} has been edited. Here's the result of running `cat -n` on a snippet of {shown}:\n{snippet}\nReview the changes and make sure they are as expected. Edit the file again if necessary."
        );
        self.remember(path, Some(text.clone()));
        Ok(EditOutput {
            content,
            path: shown,
            prev_exist: true,
            old_content: Some(text),
            new_content: Some(new_text),
        })
    }

    async fn insert(
        &mut self,
        path: &Path,
        shown: String,
        text: String,
        insert_line: i64,
        new_str: &str,
    ) -> Result<EditOutput, EditError> {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let k = usize::try_from(insert_line)
            .ok()
            .filter(|&k| k <= lines.len())
            .ok_or(EditError::InvalidInsertLine {
                line: insert_line,
                lines: lines.len(),
            })?;
        let mut new_text = lines[..k].concat();
        if !new_text.is_empty() && !new_text.ends_with('\n') {
            new_text.push('\n');
        }
        new_text.push_str(new_str);
        // Keep line structure: the inserted text ends its own line unless it became the
        // unterminated last line of a file that had none.
        if !new_str.ends_with('\n') && (k < lines.len() || text.ends_with('\n')) {
            new_text.push('\n');
        }
        new_text.push_str(&lines[k..].concat());
        self.write(path, &shown, &new_text).await?;
        let snippet = snippet(
            &new_text,
            k.saturating_sub(SNIPPET_LINES),
            k + new_str.split('\n').count() + SNIPPET_LINES - 1,
        );
        let content = format!(
            "The file {shown} has been edited. Here's the result of running `cat -n` on a snippet of the edited file:\n{snippet}\nReview the changes and make sure they are as expected (correct indentation, no duplicate lines, etc). Edit the file again if necessary."
        );
        self.remember(path, Some(text.clone()));
        Ok(EditOutput {
            content,
            path: shown,
            prev_exist: true,
            old_content: Some(text),
            new_content: Some(new_text),
        })
    }

    /// Restores the newest history entry; `current` is `None` if the file no longer exists.
    async fn undo(
        &mut self,
        path: &Path,
        shown: String,
        current: Option<String>,
    ) -> Result<EditOutput, EditError> {
        let Some(previous) = self.history.get_mut(path).and_then(Vec::pop) else {
            return Err(EditError::NoHistory { path: shown });
        };
        if self.history.get(path).is_some_and(Vec::is_empty) {
            self.history.remove(path);
        }
        let content = match &previous {
            Some(text) => {
                self.write(path, &shown, text).await?;
                format!(
                    "Last edit to {shown} undone successfully. Here's the result of running `cat -n` on {shown}:\n{}\n",
                    number_lines(text, 1)
                )
            }
            None => {
                if current.is_some() {
                    tokio::fs::remove_file(path)
                        .await
                        .map_err(|e| io_err(&shown, e))?;
                }
                format!(
                    "Last edit to {shown} undone successfully: the file did not exist before it, so it was removed."
                )
            }
        };
        Ok(EditOutput {
            content,
            path: shown,
            prev_exist: current.is_some(),
            old_content: current,
            new_content: previous,
        })
    }
}

fn io_err(path: &str, source: io::Error) -> EditError {
    EditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Removes `.` and resolves `..` without touching the filesystem (`..` at the root stays there).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// 0-based line number of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count()
}

/// `cat -n` style: each line as a 6-wide number, a tab, the line.
fn number_lines(text: &str, first: i64) -> String {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| format!("{:6}\t{line}", first + i as i64))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines `from..=to` (0-based, clamped) of `text`, numbered.
fn snippet(text: &str, from: usize, to: usize) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let to = to.min(lines.len().saturating_sub(1));
    let from = from.min(to);
    number_lines(&lines[from..=to].join("\n"), from as i64 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        ws: PathBuf,
        ed: Editor,
    }

    fn fixture_with(max_file_bytes: u64, max_output_chars: usize) -> Fixture {
        let tmp = tempfile::TempDir::new().expect("tmp");
        let ws = tmp.path().join("ws");
        std::fs::create_dir(&ws).expect("mkdir");
        let ws = ws.canonicalize().expect("canon");
        let ed = Editor::new(ws.clone(), max_file_bytes, max_output_chars);
        Fixture { _tmp: tmp, ws, ed }
    }

    fn fixture() -> Fixture {
        fixture_with(10 * 1024 * 1024, 30_000)
    }

    fn view(path: &str) -> EditCommand {
        EditCommand::View {
            path: path.into(),
            view_range: None,
        }
    }

    fn view_range(path: &str, start: i64, end: i64) -> EditCommand {
        EditCommand::View {
            path: path.into(),
            view_range: Some((start, end)),
        }
    }

    fn create(path: &str, text: &str) -> EditCommand {
        EditCommand::Create {
            path: path.into(),
            file_text: text.into(),
        }
    }

    fn replace(path: &str, old: &str, new: &str) -> EditCommand {
        EditCommand::StrReplace {
            path: path.into(),
            old_str: old.into(),
            new_str: new.into(),
        }
    }

    fn insert(path: &str, line: i64, text: &str) -> EditCommand {
        EditCommand::Insert {
            path: path.into(),
            insert_line: line,
            new_str: text.into(),
        }
    }

    fn undo(path: &str) -> EditCommand {
        EditCommand::UndoEdit { path: path.into() }
    }

    impl Fixture {
        async fn ok(&mut self, cmd: EditCommand) -> EditOutput {
            self.ed.run(&cmd).await.expect("edit succeeds")
        }
        async fn err(&mut self, cmd: EditCommand) -> EditError {
            self.ed.run(&cmd).await.expect_err("edit fails")
        }
        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.ws.join(rel)).expect("read")
        }
        fn shown(&self, rel: &str) -> String {
            self.ws.join(rel).display().to_string()
        }
    }

    #[tokio::test]
    async fn create_view_replace_insert_and_undo() {
        let mut f = fixture();
        let o = f.ok(create("src/a.py", "one\ntwo\nthree\n")).await;
        let p = f.shown("src/a.py");
        assert_eq!(o.content, format!("File created successfully at: {p}"));
        assert_eq!((o.path.as_str(), o.prev_exist), (p.as_str(), false));
        assert_eq!(o.new_content.as_deref(), Some("one\ntwo\nthree\n"));

        let o = f.ok(view(&p)).await;
        assert_eq!(
            o.content,
            format!(
                "Here's the result of running `cat -n` on {p}:\n     1\tone\n     2\ttwo\n     3\tthree\n     4\t\n"
            )
        );
        let o = f.ok(view_range("src/a.py", 2, -1)).await;
        assert!(
            o.content
                .ends_with(":\n     2\ttwo\n     3\tthree\n     4\t\n"),
            "{}",
            o.content
        );
        let o = f.ok(view_range("src/a.py", 2, 2)).await;
        assert!(o.content.ends_with(":\n     2\ttwo\n"), "{}", o.content);

        let o = f.ok(replace("src/a.py", "two", "TWO\n2")).await;
        assert_eq!(f.read("src/a.py"), "one\nTWO\n2\nthree\n");
        assert_eq!(o.old_content.as_deref(), Some("one\ntwo\nthree\n"));
        assert!(
            o.content
                .starts_with(&format!("The file {p} has been edited."))
        );
        assert!(
            o.content.contains("     2\tTWO\n     3\t2\n"),
            "{}",
            o.content
        );

        f.ok(insert("src/a.py", 0, "zero")).await;
        f.ok(insert("src/a.py", 5, "end")).await;
        let o = f.ok(insert("src/a.py", 2, "x\ny")).await;
        assert_eq!(f.read("src/a.py"), "zero\none\nx\ny\nTWO\n2\nthree\nend\n");
        assert!(
            o.content.contains("     3\tx\n     4\ty\n"),
            "{}",
            o.content
        );

        let o = f.ok(undo("src/a.py")).await;
        assert_eq!(f.read("src/a.py"), "zero\none\nTWO\n2\nthree\nend\n");
        assert!(
            o.content
                .starts_with(&format!("Last edit to {p} undone successfully."))
        );
        f.ok(undo("src/a.py")).await;
        f.ok(undo("src/a.py")).await;
        f.ok(undo("src/a.py")).await;
        assert_eq!(f.read("src/a.py"), "one\ntwo\nthree\n");
        // Undoing the create removes the file; then there is nothing left to undo.
        let o = f.ok(undo("src/a.py")).await;
        assert_eq!(o.new_content, None);
        assert!(!f.ws.join("src/a.py").exists());
        let e = f.err(undo("src/a.py")).await;
        assert!(matches!(e, EditError::NotFound { .. }), "{e}");
    }

    #[tokio::test]
    async fn insert_keeps_a_missing_final_newline_missing() {
        let mut f = fixture();
        f.ok(create("n.txt", "a\nb")).await;
        f.ok(insert("n.txt", 2, "c")).await;
        assert_eq!(f.read("n.txt"), "a\nb\nc");
        f.ok(create("e.txt", "")).await;
        f.ok(insert("e.txt", 0, "only")).await;
        assert_eq!(f.read("e.txt"), "only");
    }

    #[tokio::test]
    async fn argument_errors_are_explained() {
        let mut f = fixture();
        f.ok(create("a.txt", "x\nx\ny\n")).await;
        let p = f.shown("a.txt");
        let e = f.err(create("a.txt", "again")).await;
        assert_eq!(
            e.to_string(),
            format!(
                "Invalid `path` parameter: {p}. File already exists at: {p}. Cannot overwrite files using command `create`."
            )
        );
        let e = f.err(replace("a.txt", "zzz", "w")).await;
        assert_eq!(
            e.to_string(),
            format!("No replacement was performed, old_str `zzz` did not appear verbatim in {p}.")
        );
        let e = f.err(replace("a.txt", "x", "w")).await;
        assert_eq!(
            e.to_string(),
            "No replacement was performed. Multiple occurrences of old_str `x` in lines [1, 2]. Please ensure it is unique."
        );
        assert!(matches!(
            f.err(replace("a.txt", "y", "y")).await,
            EditError::SameStrings
        ));
        assert!(matches!(
            f.err(replace("a.txt", "", "y")).await,
            EditError::EmptyOldStr
        ));
        let e = f.err(insert("a.txt", 5, "z")).await;
        assert_eq!(
            e.to_string(),
            "Invalid `insert_line` parameter: 5. It should be within the range of lines of the file: [0, 3]"
        );
        assert!(matches!(
            f.err(insert("a.txt", -1, "z")).await,
            EditError::InvalidInsertLine { .. }
        ));
        for (s, e) in [(0, 2), (5, -1), (2, 9), (3, 2)] {
            let err = f.err(view_range("a.txt", s, e)).await;
            assert!(
                matches!(err, EditError::InvalidViewRange { .. }),
                "{s},{e}: {err}"
            );
        }
        let e = f.err(undo("new.txt")).await;
        assert!(matches!(e, EditError::NotFound { .. }), "{e}");
        let e = f.err(view("missing")).await;
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert_eq!(f.read("a.txt"), "x\nx\ny\n");
        assert!(matches!(f.err(view("  ")).await, EditError::EmptyPath));
    }

    #[tokio::test]
    async fn undo_without_history_is_refused() {
        let mut f = fixture();
        std::fs::write(f.ws.join("old.txt"), "v1").expect("write");
        let e = f.err(undo("old.txt")).await;
        assert!(matches!(e, EditError::NoHistory { .. }), "{e}");
    }

    #[tokio::test]
    async fn directories_are_listed_two_levels_deep() {
        let mut f = fixture();
        for d in ["a/b/c", ".git"] {
            std::fs::create_dir_all(f.ws.join(d)).expect("mkdir");
        }
        for file in [
            "top.txt",
            "a/one.txt",
            "a/b/two.txt",
            "a/b/c/three.txt",
            ".env",
        ] {
            std::fs::write(f.ws.join(file), "x").expect("write");
        }
        let ws = f.ws.display().to_string();
        let o = f.ok(view(&ws)).await;
        assert_eq!(
            o.content,
            format!(
                "Here's the files and directories up to 2 levels deep in {ws}, excluding hidden items:\n\
                 {ws}/\n{ws}/a/\n{ws}/top.txt\n{ws}/a/b/\n{ws}/a/one.txt\n\n\
                 2 hidden files/directories in this directory are excluded. You can use 'ls -la {ws}' to see them."
            )
        );
        assert!(matches!(
            f.err(view_range(".", 1, 2)).await,
            EditError::ViewRangeOnDirectory
        ));
        assert!(matches!(
            f.err(replace("a", "x", "y")).await,
            EditError::IsDirectory { .. }
        ));
        assert!(matches!(
            f.err(create("a", "x")).await,
            EditError::AlreadyExists { .. }
        ));
    }

    #[tokio::test]
    async fn paths_outside_the_workspace_are_refused() {
        let mut f = fixture();
        let outside_dir = f.ws.parent().expect("parent").to_owned();
        std::fs::write(outside_dir.join("secret"), "s").expect("write");
        std::os::unix::fs::symlink("/etc", f.ws.join("etc-link")).expect("symlink");
        std::os::unix::fs::symlink(outside_dir.join("secret"), f.ws.join("secret-link"))
            .expect("symlink");
        std::os::unix::fs::symlink(outside_dir.join("nothing-yet"), f.ws.join("dangling"))
            .expect("symlink");
        let cases = [
            view("/etc/passwd"),
            view("../secret"),
            view("sub/../../secret"),
            view(&format!("{}/../secret", f.ws.display())),
            view("etc-link/passwd"),
            view("secret-link"),
            replace("secret-link", "s", "t"),
            create("etc-link/new", "x"),
            create("dangling", "x"),
            create("../new", "x"),
            view("/"),
        ];
        for cmd in cases {
            let e = f.err(cmd.clone()).await;
            assert!(
                matches!(e, EditError::OutsideWorkspace { .. }),
                "{cmd:?}: {e}"
            );
            assert!(e.to_string().contains("restricted to the workspace"), "{e}");
        }
        assert!(!outside_dir.join("nothing-yet").exists());
        assert!(!outside_dir.join("new").exists());
        assert_eq!(
            std::fs::read_to_string(outside_dir.join("secret")).expect("read"),
            "s"
        );

        // Inside the workspace, through `.`/`..` and absolute paths, all is fine.
        std::os::unix::fs::symlink(f.ws.join("d"), f.ws.join("inner-link")).expect("symlink");
        std::fs::create_dir(f.ws.join("d")).expect("mkdir");
        f.ok(create("d/../d/./x.txt", "1")).await;
        let o = f
            .ok(view(&format!("{}/inner-link/x.txt", f.ws.display())))
            .await;
        assert_eq!(o.path, f.shown("d/x.txt"));
    }

    #[tokio::test]
    async fn size_limits_and_file_kinds_are_enforced() {
        let mut f = fixture_with(100, 50);
        std::fs::write(f.ws.join("big"), "x".repeat(101)).expect("write");
        assert!(matches!(
            f.err(view("big")).await,
            EditError::TooLarge { .. }
        ));
        assert!(matches!(
            f.err(create("new", &"y".repeat(101))).await,
            EditError::TooLarge { .. }
        ));
        assert!(!f.ws.join("new").exists());

        std::fs::write(f.ws.join("long"), "z\n".repeat(40)).expect("write");
        let o = f.ok(view("long")).await;
        assert!(
            o.content.ends_with(&format!("{CLIPPED_NOTE}\n")),
            "{}",
            o.content
        );

        std::fs::write(f.ws.join("bin"), b"ok\xff\n").expect("write");
        let o = f.ok(view("bin")).await;
        assert!(o.content.contains("ok\u{FFFD}"));
        assert!(matches!(
            f.err(replace("bin", "ok", "no")).await,
            EditError::NotText { .. }
        ));

        rustix::fs::mkfifoat(rustix::fs::CWD, f.ws.join("fifo"), rustix::fs::Mode::RUSR)
            .expect("mkfifo");
        assert!(matches!(
            f.err(view("fifo")).await,
            EditError::NotRegular { .. }
        ));
    }

    #[tokio::test]
    async fn history_is_bounded() {
        let mut f = fixture();
        f.ok(create("h", "0")).await;
        for i in 1..=HISTORY_DEPTH + 3 {
            f.ok(replace("h", &(i - 1).to_string(), &i.to_string()))
                .await;
        }
        for _ in 0..HISTORY_DEPTH {
            f.ok(undo("h")).await;
        }
        assert_eq!(f.read("h"), "3");
        assert!(matches!(
            f.err(undo("h")).await,
            EditError::NoHistory { .. }
        ));
    }
}
