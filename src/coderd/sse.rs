//! Incremental Server-Sent Events parser for the workspace watch stream.
//!
//! coderd frames events as `event: <type>\ndata: <json>\n\n` with types
//! `ping`, `data` and `error`. The parser is fed arbitrary chunks, handles
//! `\n`, `\r\n` and `\r` line ends, ignores comments and unknown fields, and
//! caps the size of one event so an endless line cannot exhaust memory.

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `message` when absent (per the SSE spec).
    pub kind: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// The stream broke the size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("watch stream event exceeds {0} bytes")]
pub struct TooLarge(pub usize);

/// Stateful SSE parser.
#[derive(Debug)]
pub struct Parser {
    max_event: usize,
    line: Vec<u8>,
    /// The previous byte was `\r`: a following `\n` belongs to it.
    after_cr: bool,
    kind: Option<String>,
    data: Option<String>,
    size: usize,
}

impl Parser {
    /// A parser that rejects events (and lines) larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Parser {
            max_event,
            line: Vec::new(),
            after_cr: false,
            kind: None,
            data: None,
            size: 0,
        }
    }

    /// Feed a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, TooLarge> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line)? {
                        out.push(ev);
                    }
                }
                _ => {
                    self.line.push(b);
                    if self.line.len() + self.size > self.max_event {
                        return Err(TooLarge(self.max_event));
                    }
                }
            }
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<Event>, TooLarge> {
        if line.is_empty() {
            let data = self.data.take();
            let kind = self.kind.take();
            self.size = 0;
            // An event with no data field is not dispatched (SSE spec).
            return Ok(data.map(|data| Event {
                kind: kind.unwrap_or_else(|| "message".to_string()),
                data,
            }));
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => {
                if value.len() > self.max_event {
                    return Err(TooLarge(self.max_event));
                }
                self.kind = Some(value.to_string());
            }
            "data" => {
                // Counted after UTF-8 repair, which can triple invalid bytes.
                self.size += value.len() + 1;
                if self.size > self.max_event + 1 {
                    return Err(TooLarge(self.max_event));
                }
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, data: &str) -> Event {
        Event {
            kind: kind.into(),
            data: data.into(),
        }
    }

    #[test]
    fn coderd_framing() {
        let mut p = Parser::new(1 << 20);
        let s = b"event: ping\ndata: \n\nevent: data\ndata: {\"id\":1}\n\n";
        assert_eq!(
            p.feed(s).unwrap(),
            vec![ev("ping", ""), ev("data", "{\"id\":1}")]
        );
    }

    #[test]
    fn byte_at_a_time_and_crlf() {
        let mut p = Parser::new(1 << 20);
        let s = b": comment\r\nevent:data\r\ndata:a\r\ndata: b\r\nid: 7\r\nretry: 10\r\n\r\nevent: error\rdata: x\r\r";
        let mut got = Vec::new();
        for b in s {
            got.extend(p.feed(&[*b]).unwrap());
        }
        assert_eq!(got, vec![ev("data", "a\nb"), ev("error", "x")]);
    }

    #[test]
    fn no_data_no_event_and_default_kind() {
        let mut p = Parser::new(1 << 20);
        assert!(p.feed(b"event: ping\n\n").unwrap().is_empty());
        assert_eq!(p.feed(b"data: z\n\n").unwrap(), vec![ev("message", "z")]);
        // No trailing blank line: nothing dispatched yet.
        assert!(p.feed(b"data: partial").unwrap().is_empty());
    }

    #[test]
    fn endless_line_is_capped() {
        let mut p = Parser::new(1024);
        let big = vec![b'a'; 2048];
        assert_eq!(p.feed(&big), Err(TooLarge(1024)));
        let mut p = Parser::new(1024);
        let mut many = Vec::new();
        for _ in 0..200 {
            many.extend_from_slice(b"data: 0123456789\n");
        }
        assert!(p.feed(&many).is_err());
    }

    #[test]
    fn invalid_utf8_cannot_grow_an_event_past_the_cap() {
        // Each 0xff becomes a 3-byte U+FFFD; the cap counts the repaired text.
        let mut p = Parser::new(1024);
        let mut s = b"data: ".to_vec();
        s.extend(std::iter::repeat_n(0xffu8, 600));
        s.extend_from_slice(b"\n\n");
        assert_eq!(p.feed(&s), Err(TooLarge(1024)));
    }

    #[test]
    fn garbage_is_ignored() {
        let mut p = Parser::new(1 << 20);
        let out = p
            .feed(b"\xff\xfe garbage\nnot a field\n\n\0\0\n\n")
            .unwrap();
        assert!(out.is_empty());
    }
}
