//! A small parser for Python literals as printed by `repr()` (the subset `ast.literal_eval`
//! needs for old `translated_ipython_code` values): strings in single or double quotes with
//! escapes, `True`/`False`/`None`, ints, floats, lists, tuples and dicts with string keys.
//! Anything else (bytes, sets, triple-quoted or implicitly concatenated strings) is refused.

use serde_json::{Map, Number, Value};

/// Parses one Python literal that spans the whole input (surrounding whitespace allowed).
pub(super) fn parse(src: &str) -> Option<Value> {
    let mut p = Parser {
        chars: src.char_indices().peekable(),
        src,
    };
    let value = p.value(0)?;
    p.skip_ws();
    p.chars.peek().is_none().then_some(value)
}

/// Nesting limit, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    src: &'a str,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self
            .chars
            .next_if(|&(_, c)| matches!(c, ' ' | '\t' | '\n' | '\r'))
            .is_some()
        {}
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|&(_, c)| c)
    }

    fn eat(&mut self, want: char) -> bool {
        self.chars.next_if(|&(_, c)| c == want).is_some()
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_ws();
        match self.peek()? {
            '\'' | '"' => self.string().map(Value::String),
            '[' => self.sequence(']', depth),
            '(' => self.sequence(')', depth),
            '{' => self.dict(depth),
            c if c == '-' || c == '+' || c == '.' || c.is_ascii_digit() => self.number(),
            c if c.is_ascii_alphabetic() => match self.word() {
                "True" => Some(Value::Bool(true)),
                "False" => Some(Value::Bool(false)),
                "None" => Some(Value::Null),
                _ => None,
            },
            _ => None,
        }
    }

    fn word(&mut self) -> &str {
        let start = self.chars.peek().map_or(self.src.len(), |&(i, _)| i);
        let mut end = start;
        while let Some((i, c)) = self
            .chars
            .next_if(|&(_, c)| c.is_ascii_alphanumeric() || c == '_')
        {
            end = i + c.len_utf8();
        }
        &self.src[start..end]
    }

    /// A list or a tuple (both become a JSON array); trailing comma allowed.
    fn sequence(&mut self, close: char, depth: usize) -> Option<Value> {
        self.chars.next(); // the opening bracket
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(close) {
                return Some(Value::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            if !self.eat(',') {
                self.skip_ws();
                return self.eat(close).then_some(Value::Array(items));
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Option<Value> {
        self.chars.next(); // '{'
        let mut map = Map::new();
        loop {
            self.skip_ws();
            if self.eat('}') {
                return Some(Value::Object(map));
            }
            if !matches!(self.peek(), Some('\'' | '"')) {
                return None; // only string keys map to JSON
            }
            let key = self.string()?;
            self.skip_ws();
            if !self.eat(':') {
                return None;
            }
            let value = self.value(depth + 1)?;
            map.insert(key, value);
            self.skip_ws();
            if !self.eat(',') {
                self.skip_ws();
                return self.eat('}').then_some(Value::Object(map));
            }
        }
    }

    fn number(&mut self) -> Option<Value> {
        let start = self.chars.peek().map_or(self.src.len(), |&(i, _)| i);
        let mut end = start;
        while let Some((i, c)) = self
            .chars
            .next_if(|&(_, c)| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
        {
            end = i + c.len_utf8();
        }
        let text = self.src[start..end].replace('_', "");
        let unsigned = text.strip_prefix(['-', '+']).unwrap_or(&text);
        if unsigned.is_empty() || unsigned.starts_with(['-', '+']) {
            return None;
        }
        if unsigned.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = text.parse::<i64>() {
                return Some(Value::Number(n.into()));
            }
            if let Ok(n) = unsigned.parse::<u64>() {
                return (!text.starts_with('-')).then(|| Value::Number(n.into()));
            }
            return None; // Python big ints have no JSON equivalent
        }
        let is_float_syntax = unsigned
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
        if !is_float_syntax {
            return None; // hex, octal, binary, complex: not produced by repr of our values
        }
        let f: f64 = text.parse().ok()?;
        Number::from_f64(f).map(Value::Number)
    }

    fn string(&mut self) -> Option<String> {
        let (_, quote) = self.chars.next()?;
        let mut out = String::new();
        loop {
            let (_, c) = self.chars.next()?;
            match c {
                _ if c == quote => return Some(out),
                '\n' => return None, // unterminated single-line string
                '\\' => self.escape(&mut out)?,
                _ => out.push(c),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Option<()> {
        let (_, c) = self.chars.next()?;
        match c {
            '\n' => {} // line continuation
            '\\' | '\'' | '"' => out.push(c),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'a' => out.push('\u{07}'),
            'b' => out.push('\u{08}'),
            'f' => out.push('\u{0c}'),
            'v' => out.push('\u{0b}'),
            '0'..='7' => {
                let mut code = c.to_digit(8)?;
                for _ in 0..2 {
                    match self.chars.next_if(|&(_, d)| d.is_digit(8)) {
                        Some((_, d)) => code = code * 8 + d.to_digit(8)?,
                        None => break,
                    }
                }
                out.push(char::from_u32(code)?);
            }
            'x' => out.push(char::from_u32(self.hex(2)?)?),
            'u' => {
                let code = self.hex(4)?;
                out.push(self.utf16(code));
            }
            'U' => out.push(char::from_u32(self.hex(8)?)?),
            // Python keeps unknown escapes verbatim (backslash included).
            _ => {
                out.push('\\');
                out.push(c);
            }
        }
        Some(())
    }

    fn hex(&mut self, digits: usize) -> Option<u32> {
        let mut code = 0u32;
        for _ in 0..digits {
            let (_, d) = self.chars.next()?;
            code = code * 16 + d.to_digit(16)?;
        }
        Some(code)
    }

    /// Completes a `\uXXXX` escape, joining a surrogate pair written as two escapes (Python
    /// keeps the two halves apart, but JSON readers join them, so the result is the same).
    fn utf16(&mut self, code: u32) -> char {
        if !(0xD800..0xDC00).contains(&code) {
            return char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
        }
        let mut ahead = self.chars.clone();
        let low = match (ahead.next(), ahead.next()) {
            (Some((_, '\\')), Some((_, 'u'))) => {
                let mut p = Parser {
                    chars: ahead,
                    src: self.src,
                };
                p.hex(4)
                    .filter(|low| (0xDC00..0xE000).contains(low))
                    .map(|low| (low, p.chars))
            }
            _ => None,
        };
        match low {
            Some((low, rest)) => {
                self.chars = rest;
                char::from_u32(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            }
            None => char::REPLACEMENT_CHARACTER,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::parse;

    #[test]
    fn parses_repr_of_file_editor_kwargs() {
        let src = r#"{'command': 'create', 'path': '/w/a.py', 'file_text': 'a\nb\t\'q\' "d" \\ \u00e9 \x41', 'insert_line': 3, 'view_range': [1, -1], 'x': None, 'y': True, 'z': False, 'f': 1.5, "dq": "it's", 'nested': {'k': (1, 2,)},}"#;
        assert_eq!(
            parse(src),
            Some(json!({
                "command": "create", "path": "/w/a.py",
                "file_text": "a\nb\t'q' \"d\" \\ \u{e9} A",
                "insert_line": 3, "view_range": [1, -1], "x": null, "y": true, "z": false,
                "f": 1.5, "dq": "it's", "nested": {"k": [1, 2]}
            }))
        );
    }

    #[test]
    fn joins_surrogate_pairs_and_keeps_unknown_escapes() {
        assert_eq!(parse(r"'\ud83d\ude00 \d'"), Some(json!("\u{1F600} \\d")));
        assert_eq!(parse(r"'\ud83d'"), Some(json!("\u{FFFD}")));
    }

    #[test]
    fn refuses_what_is_not_a_literal() {
        for bad in [
            "",
            "{'a': 1",
            "{'a' 1}",
            "{1: 2}",
            "'abc",
            "foo",
            "[1, 2] x",
            "b'x'",
            "0x10",
            "--1",
            "99999999999999999999999",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        let deep = "[".repeat(1000);
        assert_eq!(parse(&deep), None);
    }
}
