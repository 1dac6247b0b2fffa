//! qemu's `key=value,key=value` option strings and size syntax.

use crate::error::{Error, Result};

/// Parses a qemu size: a number with an optional `b`/`k`/`K`/`M`/`G`/`T`/`P`/`E` suffix
/// (1024-based; no suffix means bytes). Decimal fractions are allowed with a suffix
/// (`1.5G`), as qemu allows; so are hexadecimal numbers without fraction or suffix
/// (`0x10000`).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || Error::invalid(format!("invalid size '{s}'"));
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let (num, mult): (&str, u64) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c {
                'b' | 'B' => 1,
                'k' | 'K' => 1 << 10,
                'm' | 'M' => 1 << 20,
                'g' | 'G' => 1 << 30,
                't' | 'T' => 1 << 40,
                'p' | 'P' => 1 << 50,
                'e' | 'E' => 1 << 60,
                _ => return Err(bad()),
            };
            (s.get(..i).ok_or_else(bad)?, m)
        }
        Some(_) => (s, 1),
        None => return Err(bad()),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        if frac.is_empty() || frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
        let frac_v: u128 = frac.parse().map_err(|_| bad())?;
        let total = u128::from(int) * u128::from(mult) + frac_v * u128::from(mult) / scale;
        return u64::try_from(total).map_err(|_| bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// A parsed `key=value,…` option list (qemu's `-o` syntax, `,,` escapes a comma).
///
/// Format drivers `take` the keys they understand; [`OptionList::finish`] then refuses
/// whatever is left, naming the key, as qemu-img does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionList {
    entries: Vec<(String, String)>,
}

impl OptionList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `a=1,b=on,c=x,,y` (→ `c` = `x,y`). A bare key means `on`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut list = Self::new();
        list.extend_from(s)?;
        Ok(list)
    }

    /// Parses `s` and appends its entries (later values override earlier ones).
    pub fn extend_from(&mut self, s: &str) -> Result<()> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items {
            if item.is_empty() {
                continue;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.clone(), "on".to_string()),
            };
            if k.is_empty() {
                return Err(Error::invalid(format!("invalid option '{item}'")));
            }
            self.set(&k, &v);
        }
        Ok(())
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), value.to_string()));
    }

    /// The value of `key` without consuming it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when no entries remain.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The remaining entries.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// Every key under `prefix.`, moved up one level (`file.file.filename` under
    /// `file` is `file.filename`): the options of a child node in qemu's dotted syntax.
    pub fn subtree(&self, prefix: &str) -> OptionList {
        let mut out = OptionList::new();
        let p = format!("{prefix}.");
        for (k, v) in self.entries() {
            if let Some(rest) = k.strip_prefix(&p) {
                out.set(rest, v);
            }
        }
        out
    }

    /// Removes and returns `key`'s value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Removes `key` and parses it as a qemu boolean (`on/off/true/false/yes/no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "on" | "true" | "yes" => Ok(Some(true)),
                "off" | "false" | "no" => Ok(Some(false)),
                _ => Err(Error::invalid(format!(
                    "Parameter '{key}' expects 'on' or 'off'"
                ))),
            },
        }
    }

    /// Removes `key` and parses it as a size (see [`parse_size`]).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => parse_size(&v).map(Some).map_err(|_| {
                Error::invalid(format!(
                    "Parameter '{key}' expects a non-negative number below 2^64"
                ))
            }),
        }
    }

    /// Removes `key` and parses it as an unsigned integer.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::invalid(format!("Parameter '{key}' expects a number, got '{v}'"))
            }),
        }
    }

    /// Removes `key` and checks it is one of `allowed`.
    pub fn take_enum(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(Error::invalid(format!(
                "Invalid value '{v}' for parameter '{key}' (expected one of: {})",
                allowed.join(", ")
            ))),
        }
    }

    /// Fails naming the first key nobody took.
    pub fn finish(self, format: &str) -> Result<()> {
        match self.entries.first() {
            None => Ok(()),
            Some((k, _)) => Err(Error::invalid(format!(
                "Invalid parameter '{k}' for format '{format}'"
            ))),
        }
    }
}

/// The create options of qemu's `file` protocol, which qemu-img accepts for every format
/// (and lists after the format's own when `create -o help` names a target file).
/// `preallocation` is applied by the format (or by the facade when the format has no
/// such option); `extent_size_hint` (XFS) and `nocow` (btrfs) are host-file hints that
/// are validated but not applied (applying them needs ioctls).
pub static FILE_CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "extent_size_hint",
        kind: "<size>",
        help: "Extent size hint for the image file, 0 to disable",
    },
    CreateOptionSpec {
        name: "nocow",
        kind: "<bool (on/off)>",
        help: "Turn off copy-on-write (valid only on btrfs)",
    },
    CreateOptionSpec {
        name: "preallocation",
        kind: "<str>",
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
];

/// One create option a format accepts, for `create -o help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptionSpec {
    /// The key.
    pub name: &'static str,
    /// Value type as qemu prints it (`<size>`, `<bool (on/off)>`, `<str>`, `<num>`).
    pub kind: &'static str,
    /// One line of help.
    pub help: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12x").is_err());
        assert_eq!(parse_size("0x10000").unwrap(), 65536);
        assert!(parse_size("0x1.8").is_err() && parse_size("0x10k").is_err());
        assert!(parse_size("0x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16E").is_err());
    }

    #[test]
    fn option_lists() {
        let mut o = OptionList::parse("cluster_size=4k,lazy_refcounts,backing_file=a,,b").unwrap();
        assert_eq!(o.take_size("cluster_size").unwrap(), Some(4096));
        assert_eq!(o.take_bool("lazy_refcounts").unwrap(), Some(true));
        assert_eq!(o.take("backing_file").as_deref(), Some("a,b"));
        assert!(o.clone().finish("qcow2").is_ok());
        let o = OptionList::parse("bogus=1").unwrap();
        let err = o.finish("qcow2").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let mut o = OptionList::parse("x=maybe").unwrap();
        assert!(o.take_bool("x").is_err());
    }
}
