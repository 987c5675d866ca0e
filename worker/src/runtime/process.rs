//! Finding and signalling the processes of one shell, through `/proc` (Linux only).
//!
//! A shell is started as the leader of its own session and process group (`pid == pgid ==
//! sid`). Its processes are everything in that group or session, plus every descendant of the
//! leader (which catches a descendant that called `setsid` while its parent still lives).
//! Orphans of a dead leader keep their group and session ids, so they are still found.

use std::fs;

use rustix::process::{Pid, Signal};

/// One line of `/proc/<pid>/stat`, reduced to what we need.
#[derive(Debug, Clone, Copy)]
struct Stat {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    session: i32,
    /// The one-letter state (`R`, `S`, `Z`, ...).
    state: u8,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid pgrp session ...`. `comm` may contain
/// spaces and parentheses, so the fields after it are found from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find(" (")?;
    let pid = text.get(..open)?.trim().parse().ok()?;
    let close = text.rfind(')')?;
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = *rest.next()?.as_bytes().first()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    let session = rest.next()?.parse().ok()?;
    Some(Stat {
        pid,
        ppid,
        pgrp,
        session,
        state,
    })
}

fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process visible in `/proc` (entries that vanish while we read are skipped).
fn snapshot() -> Vec<Stat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        read_stat(pid)
    })
    .collect()
}

/// The live (not zombie) processes that belong to the shell led by `leader`: same process
/// group, same session, or a descendant of `leader`. Includes `leader` itself while it lives.
pub(super) fn members(leader: i32) -> Vec<i32> {
    let all = snapshot();
    let mut found: Vec<i32> = all
        .iter()
        .filter(|p| p.pid == leader || p.pgrp == leader || p.session == leader)
        .map(|p| p.pid)
        .collect();
    // Descendants of anything found so far, to a fixed point (process trees are shallow).
    loop {
        let before = found.len();
        for p in &all {
            if !found.contains(&p.pid) && found.contains(&p.ppid) {
                found.push(p.pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.retain(|&pid| {
        all.iter()
            .any(|p| p.pid == pid && !matches!(p.state, b'Z' | b'X'))
    });
    found
}

/// Proportional set size of `pid` in KiB (`/proc/<pid>/smaps_rollup`; 0 if unreadable).
pub(super) fn pss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The only child of `pid`, if it has exactly one.
pub(super) fn only_child(pid: i32) -> Option<i32> {
    let all = snapshot();
    let mut kids = all.iter().filter(|p| p.ppid == pid);
    match (kids.next(), kids.next()) {
        (Some(k), None) => Some(k.pid),
        _ => None,
    }
}

/// Whether `pid` exists and is not a zombie. (A zombie is dead; it only waits for its parent,
/// which for orphans may be a PID 1 that never reaps.)
pub(super) fn is_alive(pid: i32) -> bool {
    read_stat(pid).is_some_and(|s| !matches!(s.state, b'Z' | b'X'))
}

/// Sends `sig` to the process group `leader` and to each of `pids`. Best effort: a process
/// that is already gone is not an error, and there is nothing useful to do about others.
pub(super) fn signal(leader: i32, pids: &[i32], sig: Signal) {
    if let Some(pgid) = Pid::from_raw(leader) {
        // ESRCH (group already empty) is the expected way for this to fail.
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
    for &pid in pids {
        if let Some(pid) = Pid::from_raw(pid) {
            // Same: the process may have exited since we listed it.
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

/// Sends `sig` to the process group `leader` only (what a terminal does for C-c).
pub(super) fn signal_group(leader: i32, sig: Signal) {
    if let Some(pgid) = Pid::from_raw(leader) {
        // ESRCH means the group is already empty: nothing to interrupt.
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm_is_parsed() {
        let s = parse_stat("42 (a) b (c)) S 7 42 42 0 -1 4194560 0").expect("parse");
        assert_eq!(
            (s.pid, s.ppid, s.pgrp, s.session, s.state),
            (42, 7, 42, 42, b'S')
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_listed_by_its_session() {
        let me = i32::try_from(std::process::id()).expect("pid fits i32");
        assert!(is_alive(me));
        let own = read_stat(me).expect("own stat");
        assert!(members(own.session).contains(&me));
    }
}
