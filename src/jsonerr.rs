//! qemu's words for a malformed `json:{…}` file name, so that `Could not parse the JSON
//! options: …` reads as qemu-img's (`tests/it/json_errors.rs` asks qemu-img). qemu takes
//! strings in either quotes (bytes 0x20 and up; escapes `\" \' \\ \/ \b \f \n \r \t
//! \uXXXX`, surrogate pairs joined, no lone surrogate or non-character), numbers without
//! leading zeroes (no exponent right after a bare `0`) and `true`, `false`, `null`.
//! [`Scanner`] cuts the text into [`Piece`]s, [`next_value`] gathers one top-level
//! value's pieces, [`judge`] names their first fault and [`qemu_words`] the text's.

/// Brackets (`{` and `[` together) that may be open at once.
const MAX_DEPTH: i64 = 1024;

/// A piece of the text: one of `{}[]:,`, a string (quotes included), a number, a word.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Mark(u8),
    Str(&'a [u8]),
    Num,
    Word(&'a [u8]),
}

/// Cuts text into pieces.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    /// The bytes from `start` to here.
    fn since(&self, start: usize) -> &'a [u8] {
        self.text.get(start..self.at).unwrap_or_default()
    }

    /// Takes the next byte if `want` says so.
    fn take_if(&mut self, want: impl Fn(u8) -> bool) -> bool {
        let hit = self.peek().is_some_and(want);
        self.at += usize::from(hit);
        hit
    }

    /// The next piece, `None` at the end, `Err` with qemu's message for a stray piece (its
    /// bytes up to and with the one that broke it; scanning goes on at the next control
    /// character or punctuation mark).
    fn next(&mut self) -> Option<Result<Piece<'a>, String>> {
        while self.take_if(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n')) {}
        let start = self.at;
        let c = self.peek()?;
        self.at += 1;
        let piece = match c {
            b'{' | b'}' | b'[' | b']' | b':' | b',' => Ok(Piece::Mark(c)),
            b'"' | b'\'' => self.quoted(c).map(|()| Piece::Str(self.since(start))),
            b'-' | b'0'..=b'9' => {
                self.at = start;
                self.number().map(|()| Piece::Num)
            }
            b'a'..=b'z' => {
                while self.take_if(|c| c.is_ascii_lowercase()) {}
                Ok(Piece::Word(self.since(start)))
            }
            _ => Err(()),
        };
        Some(piece.map_err(|()| {
            let stray = String::from_utf8_lossy(self.since(start)).into_owned();
            // Skip to where a piece can start again.
            let goes_on = |c: u8| (0x20..0xfe).contains(&c) || c == b'\t';
            while self.take_if(|c| goes_on(c) && !b"{}[]:,".contains(&c)) {}
            format!("JSON parse error, stray '{stray}'")
        }))
    }

    /// The rest of a string opened by `quote`.
    fn quoted(&mut self, quote: u8) -> Result<(), ()> {
        let mut escaped = false;
        loop {
            let c = self.peek().ok_or(())?;
            self.at += 1;
            if !(0x20..=0xfd).contains(&c) {
                return Err(());
            }
            if c == quote && !escaped {
                return Ok(());
            }
            escaped = c == b'\\' && !escaped;
        }
    }

    /// A number: `-`? then `0` or digits, then `.digits`? then `[eE][+-]?digits`? (the
    /// exponent not right after a bare `0`).
    fn number(&mut self) -> Result<(), ()> {
        self.take_if(|c| c == b'-');
        let zero = self.take_if(|c| c == b'0');
        if zero && self.take_if(|c| c.is_ascii_digit()) {
            return Err(());
        }
        if !zero {
            self.digits()?;
        }
        let fraction = self.take_if(|c| c == b'.');
        if fraction {
            self.digits()?;
        }
        if (fraction || !zero) && self.take_if(|c| c == b'e' || c == b'E') {
            self.take_if(|c| c == b'+' || c == b'-');
            self.digits()?;
        }
        Ok(())
    }

    /// Digits that must come; a byte that is not one is taken into the stray piece.
    fn digits(&mut self) -> Result<(), ()> {
        let c = self.peek().ok_or(())?;
        self.at += 1;
        if !c.is_ascii_digit() {
            return Err(());
        }
        while self.take_if(|c| c.is_ascii_digit()) {}
        Ok(())
    }
}

/// Gathers and judges the pieces of the next top-level value, `Ok(false)` at the end:
/// until its brackets are closed (or one closes that was never opened), a stray piece or
/// the end; more than [`MAX_DEPTH`] brackets open at once is a fault.
fn next_value(scan: &mut Scanner<'_>) -> Result<bool, String> {
    let mut pieces = Vec::new();
    let (mut braces, mut brackets) = (0i64, 0i64);
    while let Some(piece) = scan.next() {
        let piece = piece?;
        match piece {
            Piece::Mark(b'{') => braces += 1,
            Piece::Mark(b'[') => brackets += 1,
            Piece::Mark(b'}') => braces -= 1,
            Piece::Mark(b']') => brackets -= 1,
            _ => {}
        }
        if braces + brackets > MAX_DEPTH {
            return Err("JSON nesting depth limit exceeded".into());
        }
        pieces.push(piece);
        if !((braces > 0 || brackets > 0) && braces >= 0 && brackets >= 0) {
            break;
        }
    }
    if pieces.is_empty() {
        return Ok(false);
    }
    judge(&pieces)
        .map(|()| true)
        .map_err(|e| format!("JSON parse error, {e}"))
}

/// After what an open container stands: an object's key or value, an array's item.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Key,
    Member,
    Item,
}

/// An open container: its slot, and for an object its keys so far and the last one.
struct Open {
    slot: Slot,
    keys: Vec<String>,
    key: String,
}

const EOI: &str = "premature EOI";

/// The first fault of one value's pieces, read once with a stack of open containers
/// (keys [`decode`]d: one twice in an object is a fault).
fn judge(pieces: &[Piece<'_>]) -> Result<(), String> {
    let mut it = pieces.iter();
    let mut open: Vec<Open> = Vec::new();
    loop {
        // A value; `string` is its text when it is a string.
        let mut string = None;
        match *it.next().ok_or(EOI)? {
            Piece::Mark(c @ (b'{' | b'[')) => {
                let close = Piece::Mark(if c == b'{' { b'}' } else { b']' });
                let slot = if c == b'{' { Slot::Key } else { Slot::Item };
                if it.as_slice().first() != Some(&close) {
                    let (keys, key) = (Vec::new(), String::new());
                    open.push(Open { slot, keys, key });
                    continue;
                }
                it.next();
            }
            Piece::Num => {}
            Piece::Str(s) => string = Some(decode(s)?),
            Piece::Word(b"true" | b"false" | b"null") => {}
            Piece::Word(w) => {
                return Err(format!("invalid keyword '{}'", String::from_utf8_lossy(w)));
            }
            _ => return Err("expecting value".into()),
        }
        // What follows it in the containers it completes.
        while let Some(top) = open.last_mut() {
            match top.slot {
                Slot::Key => top.key = string.take().ok_or("key is not a string in object")?,
                Slot::Member if top.keys.contains(&top.key) => return Err("duplicate key".into()),
                Slot::Member => top.keys.push(std::mem::take(&mut top.key)),
                Slot::Item => {}
            }
            top.slot = match (top.slot, *it.next().ok_or(EOI)?) {
                (Slot::Key, Piece::Mark(b':')) => Slot::Member,
                (Slot::Key, _) => return Err("missing : in object pair".into()),
                (Slot::Member, Piece::Mark(b',')) => Slot::Key,
                (Slot::Item, Piece::Mark(b',')) => Slot::Item,
                (Slot::Member, Piece::Mark(b'}')) | (Slot::Item, Piece::Mark(b']')) => {
                    open.pop();
                    string = None;
                    continue;
                }
                (Slot::Member, _) => return Err("expected separator in dict".into()),
                (Slot::Item, _) => return Err("expected separator in list".into()),
            };
            break;
        }
        if open.is_empty() {
            return Ok(());
        }
    }
}

/// A code point qemu refuses in a string: a surrogate, beyond U+10FFFF, a non-character.
fn refused(cp: u32) -> bool {
    char::from_u32(cp).is_none() || (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE
}

/// The text of a string piece (quotes included), or the fault of an escape or character.
fn decode(s: &[u8]) -> Result<String, String> {
    let hex = |at: usize| -> Option<u32> {
        let h = s.get(at..at + 4)?;
        h.iter()
            .try_fold(0, |cp, &c| Some(cp * 16 + char::from(c).to_digit(16)?))
    };
    let (mut out, mut i, end) = (String::new(), 1, s.len().saturating_sub(1));
    while i < end {
        let c = s.get(i).copied().unwrap_or(0);
        let (ch, len) = if c == b'\\' && s.get(i + 1) == Some(&b'u') {
            // \uXXXX, a leading surrogate joined with a trailing one after it.
            let (mut cp, mut len) = (hex(i + 2), 6);
            if let Some(hi @ 0xD800..=0xDBFF) = cp
                && s.get(i + 6..i + 8) == Some(&b"\\u"[..])
            {
                let lo = hex(i + 8).filter(|lo| (0xDC00..=0xDFFF).contains(lo));
                cp = lo.map(|lo| 0x10000 + ((hi & 0x3FF) << 10) + (lo & 0x3FF));
                len = if cp.is_some() { 12 } else { 6 };
            }
            match cp.filter(|&cp| !refused(cp)).and_then(char::from_u32) {
                Some(ch) => (ch, len),
                None => {
                    let shown = s.get(i..(i + len).min(s.len())).unwrap_or(&[]);
                    let shown = String::from_utf8_lossy(shown);
                    return Err(format!("{shown} is not a valid Unicode character"));
                }
            }
        } else if c == b'\\' {
            let ch = match s.get(i + 1) {
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(&e @ (b'"' | b'\'' | b'\\' | b'/')) => char::from(e),
                _ => return Err("invalid escape sequence in string".into()),
            };
            (ch, 2)
        } else {
            let rest = s.get(i..).and_then(|r| std::str::from_utf8(r).ok());
            match rest.and_then(|r| r.chars().next()) {
                Some(ch) if !refused(u32::from(ch)) => (ch, ch.len_utf8()),
                _ => return Err("invalid UTF-8 sequence in string".into()),
            }
        };
        out.push(ch);
        i += len;
    }
    Ok(out)
}

/// qemu's message for `text` (what follows `json:`), `None` when qemu's reader takes it:
/// the first fault; a second value after a good one is one, and so is no value at all.
pub(crate) fn qemu_words(text: &str) -> Option<String> {
    // qemu reads the name as a C string: up to a NUL.
    let text = text.split('\0').next().unwrap_or("").as_bytes();
    let mut scan = Scanner { text, at: 0 };
    let mut one = false;
    loop {
        match next_value(&mut scan) {
            Ok(false) => return (!one).then(|| "Expecting a JSON value".into()),
            _ if one => return Some("Expecting at most one JSON value".into()),
            Err(e) => return Some(e),
            Ok(true) => one = true,
        }
    }
}
