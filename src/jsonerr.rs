//! qemu's words for a malformed `json:{…}` file name: the error its JSON parser
//! (`qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c`, `qjson.c`) reports for
//! the same text, so `Could not parse the JSON options: …` reads as qemu's.
//!
//! The lexer is qemu's state machine (strings in double or single quotes, escapes checked
//! by the parser, lower-case keywords, numbers without leading zeroes; anything else is
//! a stray token). The streamer hands each complete top-level value (or what is left at
//! the end) to the parser; the first error wins, and a second value after a good one is
//! `Expecting at most one JSON value`.

/// A lexer state (`json-lexer.c`'s `IN_*`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    Recovery,
    Dq,
    DqEsc,
    Sq,
    SqEsc,
    Zero,
    Digits,
    Sign,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// A token type (`JSONTokenType`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Number,
    Keyword,
}

/// What one lexer step does with a byte.
enum Step {
    /// Go to this state (the byte is part of the token; `Start`: between tokens).
    To(St),
    /// The token ends with this byte.
    Emit(Tok),
    /// The token ended before this byte (which is looked at again).
    EmitBefore(Tok),
    /// A stray token (with this byte, unless at the end).
    Error,
    /// Resynchronize before this byte.
    Resync,
}

fn step(st: St, c: u8) -> Step {
    use Step::{Emit, EmitBefore, Error, To};
    let digit = c.is_ascii_digit();
    match st {
        St::Recovery => match c {
            b'\t' => To(St::Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => To(St::Recovery),
        },
        St::DqEsc | St::SqEsc if (0x20..=0xfd).contains(&c) => {
            To(if st == St::DqEsc { St::Dq } else { St::Sq })
        }
        St::Dq if c == b'"' => Emit(Tok::Str),
        St::Sq if c == b'\'' => Emit(Tok::Str),
        St::Dq if c == b'\\' => To(St::DqEsc),
        St::Sq if c == b'\\' => To(St::SqEsc),
        St::Dq | St::Sq if (0x20..=0xfd).contains(&c) => To(st),
        St::Zero if digit => Error,
        St::Zero | St::Digits if c == b'.' => To(St::Mantissa),
        St::Digits | St::MantissaDigits if c == b'e' || c == b'E' => To(St::ExpE),
        St::Digits if digit => To(St::Digits),
        St::Mantissa | St::MantissaDigits if digit => To(St::MantissaDigits),
        St::ExpE if c == b'-' || c == b'+' => To(St::ExpSign),
        St::ExpE | St::ExpSign | St::ExpDigits if digit => To(St::ExpDigits),
        St::Sign if c == b'0' => To(St::Zero),
        St::Sign if digit => To(St::Digits),
        St::Zero | St::Digits | St::MantissaDigits | St::ExpDigits => EmitBefore(Tok::Number),
        St::Keyword if c.is_ascii_lowercase() => To(St::Keyword),
        St::Keyword => EmitBefore(Tok::Keyword),
        St::Start => match c {
            b'"' => To(St::Dq),
            b'\'' => To(St::Sq),
            b'0' => To(St::Zero),
            b'1'..=b'9' => To(St::Digits),
            b'-' => To(St::Sign),
            b'{' => Emit(Tok::LCurly),
            b'}' => Emit(Tok::RCurly),
            b'[' => Emit(Tok::LSquare),
            b']' => Emit(Tok::RSquare),
            b',' => Emit(Tok::Comma),
            b':' => Emit(Tok::Colon),
            b'a'..=b'z' => To(St::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => To(St::Start),
            _ => Error,
        },
        _ => Error,
    }
}

/// The streamer and the consumer of `qobject_from_json`.
#[derive(Default)]
struct Stream {
    tokens: Vec<(Tok, String)>,
    depth: i64,
    brackets: i64,
    result: bool,
    err: Option<String>,
}

impl Stream {
    fn token(&mut self, t: Tok, s: String) {
        match t {
            Tok::LCurly => self.depth += 1,
            Tok::RCurly => self.depth -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            _ => {}
        }
        self.tokens.push((t, s));
        if (self.depth > 0 || self.brackets > 0) && self.depth >= 0 && self.brackets >= 0 {
            return;
        }
        self.parse();
    }

    fn parse(&mut self) {
        let tokens = std::mem::take(&mut self.tokens);
        let mut p = Parser { t: &tokens, at: 0 };
        let r = p.value().map(|_| ());
        self.emit(r);
    }

    fn stray(&mut self, s: &str) {
        self.emit(Err(format!("stray '{s}'")));
    }

    /// `json_message_process_token`'s emission and `consume_json`.
    fn emit(&mut self, r: Result<(), String>) {
        self.depth = 0;
        self.brackets = 0;
        self.tokens.clear();
        if self.result {
            self.result = false;
            self.err = Some("Expecting at most one JSON value".into());
        }
        if self.err.is_some() {
            return;
        }
        match r {
            Ok(()) => self.result = true,
            Err(e) if e.starts_with("Expecting") => self.err = Some(e),
            Err(e) => self.err = Some(format!("JSON parse error, {e}")),
        }
    }
}

/// `json-parser.c` over one value's tokens: the first error.
struct Parser<'a> {
    t: &'a [(Tok, String)],
    at: usize,
}

const EOI: &str = "premature EOI";

impl Parser<'_> {
    fn peek(&self) -> Option<Tok> {
        self.t.get(self.at).map(|(t, _)| *t)
    }

    fn pop(&mut self) -> Option<&(Tok, String)> {
        let t = self.t.get(self.at);
        self.at += 1;
        t
    }

    /// Parses a value; `Ok(true)` when it is a string (a valid key).
    fn value(&mut self) -> Result<bool, String> {
        match self.peek().ok_or(EOI)? {
            Tok::LCurly => self.seq(Tok::RCurly, "dict").map(|()| false),
            Tok::LSquare => self.seq(Tok::RSquare, "list").map(|()| false),
            Tok::Number => self.pop().map(|_| false).ok_or_else(|| EOI.into()),
            Tok::Str => {
                let s = self.pop().map(|(_, s)| s.clone()).unwrap_or_default();
                string(&s).map(|()| true)
            }
            Tok::Keyword => {
                let k = self.pop().map(|(_, s)| s.clone()).unwrap_or_default();
                match k.as_str() {
                    "true" | "false" | "null" => Ok(false),
                    _ => Err(format!("invalid keyword '{k}'")),
                }
            }
            _ => Err("expecting value".into()),
        }
    }

    /// An object (pairs) or an array (values) up to `close`.
    fn seq(&mut self, close: Tok, what: &str) -> Result<(), String> {
        self.pop();
        if self.peek().ok_or(EOI)? == close {
            self.pop();
            return Ok(());
        }
        loop {
            self.item(close)?;
            match self.pop().ok_or(EOI)?.0 {
                t if t == close => return Ok(()),
                Tok::Comma => {}
                _ => return Err(format!("expected separator in {what}")),
            }
        }
    }

    fn item(&mut self, close: Tok) -> Result<(), String> {
        if close == Tok::RSquare {
            return self.value().map(|_| ());
        }
        self.peek().ok_or(EOI)?;
        if !self.value()? {
            return Err("key is not a string in object".into());
        }
        if self.pop().ok_or(EOI)?.0 != Tok::Colon {
            return Err("missing : in object pair".into());
        }
        self.value().map(|_| ())
    }
}

/// A string token's escapes (`parse_string`).
fn string(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 1;
    while i + 1 < b.len() {
        if b.get(i) == Some(&b'\\') {
            match b.get(i + 1) {
                Some(b'"' | b'\'' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                Some(b'u') => {
                    let hex = s.get(i + 2..i + 6).unwrap_or("");
                    if hex.len() != 4 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                        let shown = s.get(i..(i + 6).min(b.len())).unwrap_or("");
                        return Err(format!("{shown} is not a valid Unicode character"));
                    }
                    i += 6;
                }
                _ => return Err("invalid escape sequence in string".into()),
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// qemu's message for `text` (what follows `json:`), or `None` when qemu's parser
/// takes it.
pub(crate) fn qemu_words(text: &str) -> Option<String> {
    let mut s = Stream::default();
    let mut st = St::Start;
    let mut token = String::new();
    // The bytes, then the end of input (qemu's flush).
    for c in text.bytes().map(Some).chain([None]) {
        let mut consumed = false;
        while if c.is_none() {
            st != St::Start
        } else {
            !consumed
        } {
            let step = step(st, c.unwrap_or(0));
            let takes = c.is_some() && !matches!(step, Step::EmitBefore(_) | Step::Resync);
            if takes {
                consumed = true;
                token.push(char::from(c.unwrap_or(0)));
            }
            st = match step {
                Step::To(St::Start) | Step::Resync => {
                    token.clear();
                    St::Start
                }
                Step::To(n) => n,
                Step::Emit(t) | Step::EmitBefore(t) => {
                    s.token(t, std::mem::take(&mut token));
                    St::Start
                }
                Step::Error => {
                    s.stray(&std::mem::take(&mut token));
                    St::Recovery
                }
            };
        }
    }
    if !s.tokens.is_empty() {
        s.parse();
    }
    if !s.result && s.err.is_none() {
        return Some("Expecting a JSON value".into());
    }
    s.err
}

#[cfg(test)]
mod tests {
    use super::qemu_words;

    #[test]
    fn qemu_messages() {
        // What qemu-img 10.0 prints after "Could not parse the JSON options: ".
        let p = |m: &str| Some(format!("JSON parse error, {m}"));
        assert_eq!(qemu_words("{"), p("premature EOI"));
        assert_eq!(qemu_words(r#"{"a""#), p("premature EOI"));
        assert_eq!(qemu_words(r#"{"a":}"#), p("expecting value"));
        assert_eq!(qemu_words(r#"{"a":1,}"#), p("expecting value"));
        assert_eq!(
            qemu_words(r#"{"a":1}x"#),
            Some("Expecting at most one JSON value".into())
        );
        assert_eq!(qemu_words("{broken"), p("invalid keyword 'broken'"));
        assert_eq!(qemu_words(r#"{"a":tru}"#), p("invalid keyword 'tru'"));
        assert_eq!(
            qemu_words(r#"{"a":1 "b":2}"#),
            p("expected separator in dict")
        );
        assert_eq!(qemu_words(r#"{"a":@}"#), p("stray '@'"));
        assert_eq!(qemu_words(""), Some("Expecting a JSON value".into()));
        assert_eq!(
            qemu_words(r#"{"a":"\q"}"#),
            p("invalid escape sequence in string")
        );
        assert_eq!(qemu_words(r#"{"a":01}"#), p("stray '01'"));
        assert_eq!(qemu_words("{1:2}"), p("key is not a string in object"));
        assert_eq!(qemu_words("{'a':[1,true,null,-2.5e3],'b':{}}"), None);
    }
}
