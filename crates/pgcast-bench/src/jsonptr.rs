//! JSON pointer (RFC 6901) lookup over raw bytes, without parsing the document: members are
//! skipped until the path matches, so finding `/row/id` near the start of a NOTIFY payload
//! costs a few dozen byte comparisons and no allocation.

use anyhow::{bail, Result};

/// A parsed pointer: its reference tokens, unescaped (`~1` → `/`, `~0` → `~`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pointer(Vec<String>);

impl Pointer {
    pub(crate) fn parse(text: &str) -> Result<Pointer> {
        if text.is_empty() {
            return Ok(Pointer(Vec::new()));
        }
        let Some(rest) = text.strip_prefix('/') else {
            bail!("JSON pointer {text:?} must start with '/'");
        };
        Ok(Pointer(
            rest.split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect(),
        ))
    }

    /// The value at this pointer in `json`: a string's contents (without quotes, escapes left
    /// as they are) or the raw text of any other value. `None` if absent or malformed.
    pub(crate) fn lookup<'a>(&self, json: &'a [u8]) -> Option<&'a [u8]> {
        let mut s = Scanner { b: json, i: 0 };
        for token in &self.0 {
            s.ws();
            match s.peek()? {
                b'{' => {
                    s.i += 1;
                    loop {
                        s.ws();
                        if s.peek()? == b'}' {
                            return None;
                        }
                        let key = s.string()?;
                        s.ws();
                        s.expect(b':')?;
                        if key == token.as_bytes() {
                            break;
                        }
                        s.skip_value()?;
                        s.ws();
                        match s.next()? {
                            b',' => continue,
                            _ => return None,
                        }
                    }
                }
                b'[' => {
                    let index: usize = token.parse().ok()?;
                    s.i += 1;
                    for _ in 0..index {
                        s.ws();
                        if s.peek()? == b']' {
                            return None;
                        }
                        s.skip_value()?;
                        s.ws();
                        s.expect(b',')?;
                    }
                    s.ws();
                    if s.peek()? == b']' {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        s.ws();
        if s.peek()? == b'"' {
            s.string()
        } else {
            let start = s.i;
            s.skip_value()?;
            Some(&json[start..s.i])
        }
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string's raw contents; the scanner ends after its closing quote.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            let rel = memchr::memchr2(b'"', b'\\', &self.b[self.i..])?;
            self.i += rel;
            if self.b[self.i] == b'\\' {
                self.i += 2;
            } else {
                let s = &self.b[start..self.i];
                self.i += 1;
                return Some(s);
            }
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                let start = self.i;
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(p: &str, j: &'a str) -> Option<&'a str> {
        Pointer::parse(p)
            .unwrap()
            .lookup(j.as_bytes())
            .map(|b| std::str::from_utf8(b).unwrap())
    }

    #[test]
    fn finds_values_in_a_notify_payload() {
        // The shape PostgreSQL gives jsonb::text: spaces after ':' and ','.
        let j = r#"{"op": "update", "old": {"status": "queued", "mechanic_id": null}, "row": {"id": "7f0e", "urgent": false, "customer_name": "a\"b}"}, "position": 42}"#;
        assert_eq!(get("/row/id", j), Some("7f0e"));
        assert_eq!(get("/position", j), Some("42"));
        assert_eq!(get("/old/mechanic_id", j), Some("null"));
        assert_eq!(get("/row/customer_name", j), Some(r#"a\"b}"#));
        assert_eq!(get("/row/urgent", j), Some("false"));
        assert_eq!(
            get("/old", j),
            Some(r#"{"status": "queued", "mechanic_id": null}"#)
        );
        assert_eq!(get("/row/missing", j), None);
        assert_eq!(get("/nope/id", j), None);
    }

    #[test]
    fn arrays_escapes_and_bad_input() {
        let j = r#"{"a/b":[1,{"x":[true]},"s"],"m~n":{"":3}}"#;
        assert_eq!(get("/a~1b/0", j), Some("1"));
        assert_eq!(get("/a~1b/1/x/0", j), Some("true"));
        assert_eq!(get("/a~1b/2", j), Some("s"));
        assert_eq!(get("/a~1b/3", j), None);
        assert_eq!(get("/m~0n/", j), Some("3"));
        assert_eq!(get("", "  7 "), Some("7"));
        assert_eq!(get("/a", "not json"), None);
        assert_eq!(get("/a", r#"{"a":"unterminated"#), None);
        assert!(Pointer::parse("row/id").is_err());
    }
}
