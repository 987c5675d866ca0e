//! Command output: finding the end-of-command marker in the shell's byte stream, and keeping a
//! bounded, middle-truncated copy of what came before it.
//!
//! **Invariant:** memory per command is bounded by the configured character cap (head and tail
//! of at most `2 * max_chars` bytes each, plus a window shorter than the marker line), whatever
//! the command prints.

use std::borrow::Cow;

/// What OpenHands puts where it cut the middle of an observation.
pub(crate) const TRUNCATION_MARKER: &str = "\n[... Observation truncated due to length ...]\n";

/// Cuts `text` to `max_chars` characters by dropping its middle, OpenHands' way: the first and
/// last `max_chars / 2` characters around [`TRUNCATION_MARKER`].
pub(crate) fn truncate_middle(text: &str, max_chars: usize) -> Cow<'_, str> {
    if text.chars().count() <= max_chars {
        return Cow::Borrowed(text);
    }
    let half = max_chars / 2;
    Cow::Owned(join_halves(text, text, half))
}

/// First `half` characters of `head`, the marker, last `half` characters of `tail`.
fn join_halves(head: &str, tail: &str, half: usize) -> String {
    let head_end = head.char_indices().nth(half).map_or(head.len(), |(i, _)| i);
    let tail_len = tail.chars().count();
    let tail_start = tail
        .char_indices()
        .nth(tail_len.saturating_sub(half))
        .map_or(tail.len(), |(i, _)| i);
    let mut out = String::with_capacity(head_end + TRUNCATION_MARKER.len() + tail.len());
    out.push_str(&head[..head_end]);
    out.push_str(TRUNCATION_MARKER);
    out.push_str(&tail[tail_start..]);
    out
}

/// Longest `<exit code> <cwd>` part of a marker line (longer: not a marker).
const MAX_MARKER_TAIL: usize = 8 * 1024;

/// A bounded copy of a command's output: the first and the last `2 * max_chars` bytes (enough
/// for `max_chars / 2` characters of any width at each end).
#[derive(Debug)]
pub(super) struct Capture {
    max_chars: usize,
    cap: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Bytes were dropped between `head` and `tail`.
    dropped: bool,
}

impl Capture {
    pub(super) fn new(max_chars: usize) -> Self {
        Self {
            max_chars,
            cap: max_chars.saturating_mul(2).max(64),
            head: Vec::new(),
            tail: Vec::new(),
            dropped: false,
        }
    }

    pub(super) fn push(&mut self, mut data: &[u8]) {
        if self.head.len() < self.cap {
            let take = (self.cap - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.is_empty() {
            return;
        }
        if data.len() >= self.cap {
            self.dropped |= !self.tail.is_empty() || data.len() > self.cap;
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - self.cap..]);
            return;
        }
        self.tail.extend_from_slice(data);
        if self.tail.len() > self.cap {
            let excess = self.tail.len() - self.cap;
            self.tail.drain(..excess);
            self.dropped = true;
        }
    }

    /// The text to show: invalid UTF-8 replaced, trailing newlines removed, middle-truncated
    /// to `max_chars`.
    pub(super) fn finish(self) -> String {
        if !self.dropped {
            let mut all = self.head;
            all.extend_from_slice(&self.tail);
            let text = String::from_utf8_lossy(&all);
            return truncate_middle(text.trim_end_matches('\n'), self.max_chars).into_owned();
        }
        // Skip the continuation bytes of a character whose start was dropped.
        let skip = self
            .tail
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        let head = String::from_utf8_lossy(&self.head);
        let tail = String::from_utf8_lossy(&self.tail[skip..]);
        join_halves(&head, tail.trim_end_matches('\n'), self.max_chars / 2)
    }
}

/// How a command ended, as printed by the marker line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Marker {
    /// `$?` of the command; -1 if the line could not be parsed.
    pub(super) exit_code: i64,
    /// `$PWD` after the command.
    pub(super) cwd: String,
}

/// Finds the marker line `\n<marker> <exit code> <cwd>\n` of one command in the shell's
/// output, passing everything before it to a [`Capture`].
#[derive(Debug)]
pub(super) struct Scanner {
    /// `\n<marker> `: the part of the marker line known in advance.
    prefix: Vec<u8>,
    /// Bytes held back: a possible start of the marker line.
    window: Vec<u8>,
    /// How many bytes at the start of `window` were already shown (on a timeout).
    shown: usize,
}

impl Scanner {
    pub(super) fn new(marker: &str) -> Self {
        Self {
            prefix: format!("\n{marker} ").into_bytes(),
            window: Vec::new(),
            shown: 0,
        }
    }

    /// Passes `window[..end]` to `capture`, except what was shown already, and drops it.
    fn emit(&mut self, end: usize, capture: &mut Capture) {
        if end > self.shown {
            capture.push(&self.window[self.shown..end]);
        }
        self.window.drain(..end);
        self.shown = self.shown.saturating_sub(end);
    }

    /// Feeds output. Returns the marker and the bytes that followed it (output of background
    /// processes, which belongs to whatever runs next) once the marker line is complete.
    pub(super) fn feed(&mut self, data: &[u8], capture: &mut Capture) -> Option<(Marker, Vec<u8>)> {
        self.window.extend_from_slice(data);
        while let Some(pos) = find(&self.window, &self.prefix) {
            self.emit(pos, capture);
            let after = self.prefix.len();
            let Some(nl) = self.window[after..].iter().position(|&b| b == b'\n') else {
                if self.window.len() <= after + MAX_MARKER_TAIL {
                    return None;
                }
                // Too long for a marker line: it was output that looks like one.
                self.emit(1, capture);
                continue;
            };
            let marker = parse_marker(&self.window[after..after + nl]);
            let rest = self.window.split_off(after + nl + 1);
            self.window.clear();
            self.shown = 0;
            return Some((marker, rest));
        }
        // Hold back only the longest tail that could still become the prefix.
        let keep = (1..self.prefix.len().min(self.window.len() + 1))
            .rev()
            .find(|&k| self.window.ends_with(&self.prefix[..k]))
            .unwrap_or(0);
        self.emit(self.window.len() - keep, capture);
        None
    }

    /// Passes everything held back to `capture` (the shell is gone; no marker will come).
    pub(super) fn flush(&mut self, capture: &mut Capture) {
        self.emit(self.window.len(), capture);
    }

    /// Shows what is held back (the output so far, at a timeout) but keeps it for matching;
    /// it is not shown again.
    pub(super) fn show_held(&mut self, capture: &mut Capture) {
        if self.window.len() > self.shown {
            capture.push(&self.window[self.shown..]);
        }
        self.shown = self.window.len();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_marker(line: &[u8]) -> Marker {
    let line = String::from_utf8_lossy(line);
    let (code, cwd) = line.split_once(' ').unwrap_or((&line, ""));
    Marker {
        exit_code: code.trim().parse().unwrap_or(-1),
        cwd: cwd.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_not_truncated() {
        assert_eq!(truncate_middle("abc", 3), "abc");
    }

    #[test]
    fn long_text_keeps_both_ends_around_the_marker() {
        let t = truncate_middle("aaaaXXXXbbbb", 8);
        assert_eq!(t, format!("aaaa{TRUNCATION_MARKER}bbbb"));
        let t = truncate_middle("ééééXXXXüüüü", 8);
        assert_eq!(t, format!("éééé{TRUNCATION_MARKER}üüüü"));
    }

    #[test]
    fn capture_keeps_head_and_tail_of_huge_output() {
        let mut c = Capture::new(100);
        c.push(b"start\n");
        for _ in 0..10_000 {
            c.push(b"middle middle middle\n");
        }
        c.push(b"end\n");
        let text = c.finish();
        assert!(text.starts_with("start\nmiddle"), "{text}");
        assert!(text.ends_with("middle\nend"), "{text}");
        assert!(text.contains(TRUNCATION_MARKER));
        assert_eq!(
            text.chars().count(),
            100 + TRUNCATION_MARKER.chars().count()
        );
    }

    #[test]
    fn capture_replaces_invalid_utf8_and_trims_newlines() {
        let mut c = Capture::new(100);
        c.push(b"ok \xff\xfe\n\n");
        assert_eq!(c.finish(), "ok \u{FFFD}\u{FFFD}");
    }

    #[test]
    fn scanner_finds_marker_split_across_chunks() {
        let mut s = Scanner::new("__M_1__");
        let mut c = Capture::new(1000);
        let stream = b"hi\n\n__M_1__ 3 /tmp/a b\nlater";
        let mut found = None;
        for chunk in stream.chunks(3) {
            if let Some(m) = s.feed(chunk, &mut c) {
                found = Some(m);
                break;
            }
        }
        let (marker, rest) = found.expect("marker found");
        assert_eq!(marker.exit_code, 3);
        assert_eq!(marker.cwd, "/tmp/a b");
        assert!(b"later".starts_with(&rest), "{rest:?}");
        assert_eq!(c.finish(), "hi");
    }

    #[test]
    fn scanner_ignores_other_markers_and_holds_back_little() {
        let mut s = Scanner::new("__M_2__");
        let mut c = Capture::new(1000);
        assert!(s.feed(b"x\n__M_1__ 0 /\nabc\n", &mut c).is_none());
        assert_eq!(s.window, b"\n");
        s.flush(&mut c);
        assert_eq!(c.finish(), "x\n__M_1__ 0 /\nabc");
    }

    #[test]
    fn an_endless_fake_marker_line_does_not_grow_the_window() {
        let mut s = Scanner::new("__M__");
        let mut c = Capture::new(100);
        assert!(s.feed(b"\n__M__ ", &mut c).is_none());
        for _ in 0..100 {
            assert!(s.feed(&[b'y'; 1024], &mut c).is_none());
        }
        assert!(s.window.len() < 2 * MAX_MARKER_TAIL, "{}", s.window.len());
        let (m, _) = s.feed(b"\n__M__ 1 /\n", &mut c).expect("real marker");
        assert_eq!(m.exit_code, 1);
    }

    #[test]
    fn held_back_bytes_are_shown_once_and_still_matched() {
        let mut s = Scanner::new("__M__");
        let mut first = Capture::new(1000);
        assert!(s.feed(b"start\n", &mut first).is_none());
        s.show_held(&mut first);
        assert_eq!(first.finish(), "start");
        let mut second = Capture::new(1000);
        assert!(s.feed(b"\n__M", &mut second).is_none());
        let (m, _) = s.feed(b"__ 0 /\n", &mut second).expect("marker");
        assert_eq!(m.exit_code, 0);
        assert_eq!(second.finish(), "");
        let mut third = Capture::new(1000);
        assert!(s.feed(b"a\n", &mut third).is_none());
        s.show_held(&mut third);
        assert!(s.feed(b"b\n", &mut third).is_none());
        s.flush(&mut third);
        assert_eq!(third.finish(), "a\nb");
    }
}
