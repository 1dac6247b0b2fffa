//! qemu-io's number syntax: `cvtnum` (qemu's `qemu_strtosz`: `4k`, `1.5M`, `0x200`) and
//! pattern bytes (`strtol` base 0: `0xab`, `0253`, `171`), with their error messages.

/// Why `cvtnum` refused an argument (qemu's `-EINVAL` / `-ERANGE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NumError {
    /// Not a number, or an unknown suffix.
    Invalid,
    /// Negative, or above `i64::MAX`.
    Range,
}

impl NumError {
    /// qemu-io's `print_cvtnum_err` text for `arg` (on stdout).
    pub(crate) fn message(self, arg: &str) -> String {
        match self {
            NumError::Invalid => format!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
            ),
            NumError::Range => format!("Parsing error: argument too large -- {arg}\n"),
        }
    }
}

fn suffix_mul(c: Option<char>) -> Option<u64> {
    Some(match c?.to_ascii_uppercase() {
        'B' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        'P' => 1 << 50,
        'E' => 1 << 60,
        _ => return None,
    })
}

/// Splits leading decimal digits (after whitespace and an optional sign).
fn digits(s: &str) -> (bool, &str, &str) {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = t.bytes().take_while(u8::is_ascii_digit).count();
    (neg, t.get(..n).unwrap_or(""), t.get(n..).unwrap_or(""))
}

/// qemu-io's `cvtnum`: a byte count with an optional binary suffix, a fraction with a
/// suffix (`1.5k`), or hex (`0x1000`, no suffix).
pub(crate) fn cvtnum(s: &str) -> Result<u64, NumError> {
    let (neg, int, rest) = digits(s);
    if int.is_empty() && !rest.starts_with('.') {
        return Err(NumError::Invalid);
    }
    if neg {
        return Err(NumError::Range);
    }
    let val: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| NumError::Range)?
    };
    if val == 0 && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = rest.get(1..).unwrap_or("");
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NumError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| NumError::Range)?;
        return i64::try_from(v).map(|_| v).map_err(|_| NumError::Range);
    }
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            let f: f64 = format!("0.{}", r.get(..n).unwrap_or(""))
                .parse()
                .unwrap_or(0.0);
            (f, r.get(n..).unwrap_or(""))
        }
        None => (0.0, rest),
    };
    let mut chars = rest.chars();
    let (mul, rest) = match suffix_mul(chars.next()) {
        Some(m) => (m, chars.as_str()),
        None => (1, rest),
    };
    if !rest.is_empty() || (mul == 1 && frac != 0.0) {
        return Err(NumError::Invalid);
    }
    let whole = u128::from(val) * u128::from(mul);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let part = (frac * mul as f64).round() as u128;
    let v = u64::try_from(whole + part).map_err(|_| NumError::Range)?;
    i64::try_from(v).map(|_| v).map_err(|_| NumError::Range)
}

/// qemu-io's `parse_pattern`: one byte, as C's `strtol(arg, …, 0)` reads it.
pub(crate) fn parse_pattern(s: &str) -> Result<u8, String> {
    let bad = || format!("{s} is not a valid pattern byte\n");
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (radix, body) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, t.get(1..).unwrap_or(""))
    } else {
        (10, t)
    };
    if body.is_empty() {
        // strtol parsed nothing (or just "0"): the value is 0 if nothing else follows.
        return if t.is_empty() || t == "0" {
            Ok(0)
        } else {
            Err(bad())
        };
    }
    let v = i64::from_str_radix(body, radix).map_err(|_| bad())?;
    let v = if neg { -v } else { v };
    u8::try_from(v).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_strtosz() {
        assert_eq!(cvtnum("512"), Ok(512));
        assert_eq!(cvtnum("4k"), Ok(4096));
        assert_eq!(cvtnum("1.5M"), Ok(3 << 19));
        assert_eq!(cvtnum("0x200"), Ok(512));
        assert_eq!(cvtnum("64K"), Ok(65536));
        assert_eq!(cvtnum("1b"), Ok(1));
        assert_eq!(cvtnum("0x10k"), Err(NumError::Invalid));
        assert_eq!(cvtnum("1.5"), Err(NumError::Invalid));
        assert_eq!(cvtnum("abc"), Err(NumError::Invalid));
        assert_eq!(cvtnum("-1"), Err(NumError::Range));
        assert_eq!(cvtnum("8E"), Err(NumError::Range));
        assert_eq!(cvtnum("18446744073709551616"), Err(NumError::Range));
    }

    #[test]
    fn patterns_like_strtol() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("0253"), Ok(0o253));
        assert_eq!(parse_pattern("171"), Ok(171));
        assert_eq!(parse_pattern("0"), Ok(0));
        assert!(parse_pattern("300").is_err());
        assert!(parse_pattern("-1").is_err());
        assert!(parse_pattern("0xg").is_err());
    }
}
