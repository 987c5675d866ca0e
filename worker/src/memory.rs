//! Memory: what the agent recalls when a user message arrives (OpenHands' `recall`).
//!
//! - The conversation's first user message recalls the **workspace context**: the workspace's
//!   instructions (`AGENTS.md`, else `.openhands/microagents/repo.md`), the conversation's
//!   instructions, the working directory and the date.
//! - Every user message recalls **knowledge**: files of `OH_KNOWLEDGE_DIR` (`*.md` with a
//!   front matter listing `triggers`) whose trigger appears in the message (case-insensitive).
//!
//! The result is a `recall` observation, or a `null` observation when nothing was found.

use std::path::Path;

use shared::event::{RecallContext, RecallType, RecalledKnowledge};

/// One knowledge file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Knowledge {
    pub(crate) name: String,
    pub(crate) triggers: Vec<String>,
    pub(crate) content: String,
}

/// Reads every knowledge file of `dir` (unreadable or trigger-less files are skipped).
pub(crate) fn load_knowledge(dir: &Path) -> Vec<Knowledge> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Knowledge> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let (triggers, content) = parse_front_matter(&text)?;
            Some(Knowledge {
                name: p.file_stem()?.to_string_lossy().into_owned(),
                triggers,
                content,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `---\ntriggers:\n- a\n- b\n---\nbody` (or `triggers: [a, b]`) → (triggers, body).
fn parse_front_matter(text: &str) -> Option<(Vec<String>, String)> {
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---")?;
    let (head, body) = (&rest[..end], &rest[end + 4..]);
    let mut triggers = Vec::new();
    let mut in_list = false;
    for line in head.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("triggers:") {
            let v = v.trim();
            in_list = v.is_empty();
            if let Some(inner) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                triggers.extend(
                    inner
                        .split(',')
                        .map(|s| s.trim().trim_matches(['"', '\'']).to_owned())
                        .filter(|s| !s.is_empty()),
                );
            }
        } else if in_list && let Some(item) = t.strip_prefix("- ") {
            triggers.push(item.trim().trim_matches(['"', '\'']).to_owned());
        } else if !t.is_empty() {
            in_list = false;
        }
    }
    (!triggers.is_empty()).then(|| (triggers, body.trim_start_matches('\n').to_owned()))
}

/// Most bytes of the workspace's instructions read.
const MAX_INSTRUCTIONS_BYTES: u64 = 1024 * 1024;

/// The workspace's instructions: `AGENTS.md`, else `.openhands/microagents/repo.md`.
pub(crate) fn workspace_instructions(workspace: &Path) -> Option<String> {
    ["AGENTS.md", ".openhands/microagents/repo.md"]
        .iter()
        .find_map(|f| read_no_follow(workspace, f))
}

/// A text file of the workspace, read from the host side: `None` if any component of `rel`
/// is a symlink (the agent could point one at a host file), it is not a regular file, is over
/// [`MAX_INSTRUCTIONS_BYTES`] or is not UTF-8.
fn read_no_follow(workspace: &Path, rel: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut p = workspace.to_path_buf();
    for part in rel.split('/') {
        p.push(part);
        if std::fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&p)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_INSTRUCTIONS_BYTES {
        return None;
    }
    let mut text = String::new();
    file.take(MAX_INSTRUCTIONS_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// What memory recalls for `query`, or `None` if nothing was recalled.
pub(crate) fn recall(
    workspace: &Path,
    knowledge: &[Knowledge],
    query: &str,
    first: bool,
    conversation_instructions: Option<&str>,
) -> Option<RecallContext> {
    let lower = query.to_lowercase();
    let triggered: Vec<RecalledKnowledge> = knowledge
        .iter()
        .filter_map(|k| {
            let t = k
                .triggers
                .iter()
                .find(|t| lower.contains(&t.to_lowercase()))?;
            Some(RecalledKnowledge {
                name: k.name.clone(),
                trigger: t.clone(),
                content: k.content.clone(),
            })
        })
        .collect();
    let instructions = if first {
        workspace_instructions(workspace).unwrap_or_default()
    } else {
        String::new()
    };
    if !first && triggered.is_empty() {
        return None;
    }
    if first
        && instructions.is_empty()
        && triggered.is_empty()
        && conversation_instructions.is_none()
    {
        return None;
    }
    Some(RecallContext {
        recall_type: if first {
            RecallType::WorkspaceContext
        } else {
            RecallType::Knowledge
        },
        repo_instructions: instructions,
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        conversation_instructions: conversation_instructions.unwrap_or_default().to_owned(),
        working_dir: workspace.display().to_string(),
        knowledge: triggered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_and_triggers() {
        let (t, body) = parse_front_matter(
            "---\nname: k8s\ntriggers:\n- kubernetes\n- k8s\n---\nUse kubectl.\n",
        )
        .unwrap();
        assert_eq!(t, ["kubernetes", "k8s"]);
        assert_eq!(body, "Use kubectl.\n");
        let (t, _) = parse_front_matter("---\ntriggers: [docker, 'podman']\n---\nx").unwrap();
        assert_eq!(t, ["docker", "podman"]);
        assert!(parse_front_matter("no front matter").is_none());
        assert!(parse_front_matter("---\nname: x\n---\nbody").is_none());
    }

    #[test]
    fn recall_workspace_and_knowledge() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("AGENTS.md"), "Run make test.").unwrap();
        let k = vec![Knowledge {
            name: "k8s".into(),
            triggers: vec!["Kubernetes".into()],
            content: "Use kubectl.".into(),
        }];
        let first = recall(ws.path(), &k, "hello", true, None).unwrap();
        assert_eq!(first.recall_type, RecallType::WorkspaceContext);
        assert_eq!(first.repo_instructions, "Run make test.");
        assert!(recall(ws.path(), &k, "hello again", false, None).is_none());
        let later = recall(ws.path(), &k, "deploy on kubernetes", false, None).unwrap();
        assert_eq!(later.recall_type, RecallType::Knowledge);
        assert_eq!(later.knowledge[0].content, "Use kubectl.");
        assert_eq!(later.repo_instructions, "");
    }

    #[test]
    fn instructions_are_never_read_through_a_symlink() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), ws.path().join("AGENTS.md"))
            .unwrap();
        assert_eq!(workspace_instructions(ws.path()), None);
        // Nor through a linked folder.
        std::fs::write(outside.path().join("repo.md"), "host file").unwrap();
        std::fs::create_dir(ws.path().join(".openhands")).unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join(".openhands/microagents"))
            .unwrap();
        assert_eq!(workspace_instructions(ws.path()), None);
        // A real file is read.
        std::fs::remove_file(ws.path().join("AGENTS.md")).unwrap();
        std::fs::write(ws.path().join("AGENTS.md"), "Run make test.").unwrap();
        assert_eq!(
            workspace_instructions(ws.path()).as_deref(),
            Some("Run make test.")
        );
    }
}
