//! qemu's `blkdebug` driver over an opened image, for qemu-io: `[inject-error]` rules
//! (from a config file or `inject-error.N.*` options) that make requests fail with an
//! errno once their event has happened.
//!
//! As in qemu (`block/blkdebug.c`), an event activates its rules; a request then fails
//! when an active rule's iotype includes it and its `sector` (if any) lies inside the
//! request; a `once` rule is dropped after it fired. The events raised here are the
//! generic block layer's on the blkdebug node itself: `cor_write` (a copy-on-read write,
//! raised by [`super::layers::CopyOnRead`]). Rules on other events (the format drivers'
//! internal ones such as `l1_update`) and `state` conditions are refused with a message,
//! never silently ignored. `[set-state]` rules are accepted and have no effect: the
//! state only matters to rules with a `state` condition, which are refused.

use std::sync::{Arc, Mutex};

use anyhow::{Result as AnyResult, anyhow, bail};
use diskimg::blockio::ZeroFlags;
use diskimg::{BlockDevice, OptionList, Result};

use super::filter::Filter;

/// The events diskimg raises (`none`: the rule is active from the start).
const EVENTS: &[&str] = &["cor_write", "none"];

/// Request kinds (qemu's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoType {
    Read = 0,
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    Flush = 4,
    BlockStatus = 5,
}

const IOTYPES: &[(&str, IoType)] = &[
    ("read", IoType::Read),
    ("write", IoType::Write),
    ("write-zeroes", IoType::WriteZeroes),
    ("discard", IoType::Discard),
    ("flush", IoType::Flush),
    ("block-status", IoType::BlockStatus),
];

/// One `[inject-error]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    event: String,
    errno: i32,
    /// Byte offset (`sector` × 512) the request must contain, if any.
    offset: Option<u64>,
    once: bool,
    /// Bit `IoType as u32` set for the request kinds it fails.
    iotypes: u32,
}

impl Rule {
    /// Builds a rule from its keys (`event`, `errno`, `sector`, `once`, `immediately`,
    /// `iotype`); `get` looks a key up.
    fn from_keys(get: &dyn Fn(&str) -> Option<String>, keys: &[String]) -> AnyResult<Rule> {
        for k in keys {
            if !["event", "errno", "sector", "once", "immediately", "iotype"].contains(&k.as_str())
            {
                bail!("blkdebug option '{k}' is not supported by diskimg");
            }
        }
        let event = get("event").ok_or_else(|| anyhow!("Missing event name for rule"))?;
        if !EVENTS.contains(&event.as_str()) {
            bail!("blkdebug event '{event}' is not supported by diskimg");
        }
        let num = |k: &str| -> AnyResult<Option<i64>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| anyhow!("Parameter '{k}' expects a number"))
                })
                .transpose()
        };
        let flag = |k: &str| -> AnyResult<bool> {
            get(k).map_or(Ok(false), |v| crate::imgspec::parse_bool(k, &v))
        };
        let errno = num("errno")?.unwrap_or(5);
        let errno =
            i32::try_from(errno).map_err(|_| anyhow!("Parameter 'errno' is out of range"))?;
        let offset = match num("sector")? {
            None | Some(-1) => None,
            Some(s) => Some(
                u64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(512))
                    .ok_or_else(|| anyhow!("Invalid sector {s}"))?,
            ),
        };
        let iotypes = match get("iotype") {
            // qemu's default: every kind of request.
            None => IOTYPES.iter().fold(0, |m, (_, t)| m | 1 << *t as u32),
            Some(t) => {
                let ty = IOTYPES
                    .iter()
                    .find(|(n, _)| *n == t)
                    .ok_or_else(|| anyhow!("Invalid parameter '{t}'"))?;
                1 << ty.1 as u32
            }
        };
        // `immediately` only decides whether the failing request yields first.
        flag("immediately")?;
        Ok(Rule {
            event,
            errno,
            offset,
            once: flag("once")?,
            iotypes,
        })
    }
}

/// Parses a blkdebug config file (`[section]` lines, `key = "value"` lines).
pub(crate) fn parse_config(text: &str) -> AnyResult<Vec<Rule>> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow!("Could not parse blkdebug config line '{l}'"))?;
        let v = v.trim().trim_matches('"').to_string();
        let Some((_, keys)) = sections.last_mut() else {
            bail!("blkdebug config: '{l}' outside a section");
        };
        keys.push((k.trim().to_string(), v));
    }
    let mut rules = Vec::new();
    for (name, keys) in sections {
        match name.as_str() {
            "inject-error" => {}
            // Unobservable without `state` conditions (see the module docs).
            "set-state" => continue,
            _ => bail!("blkdebug [{name}] rules are not supported by diskimg"),
        }
        let get = |k: &str| {
            keys.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let names: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        rules.push(Rule::from_keys(&get, &names)?);
    }
    Ok(rules)
}

/// The `inject-error.N.*` rules of a blkdebug node's options (`o` relative to it).
pub(crate) fn option_rules(o: &OptionList) -> AnyResult<Vec<Rule>> {
    let mut rules = Vec::new();
    for i in 0.. {
        let p = format!("inject-error.{i}.");
        let keys: Vec<String> = o
            .entries()
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&p).map(str::to_string))
            .collect();
        if keys.is_empty() {
            break;
        }
        let get = |k: &str| o.get(&format!("{p}{k}")).map(str::to_string);
        rules.push(Rule::from_keys(&get, &keys)?);
    }
    Ok(rules)
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    /// Indices into `rules` of the active ones, newest first.
    active: Vec<usize>,
}

/// A blkdebug node's request limits (`align`, `max-transfer`, `opt-write-zero`,
/// `max-write-zero`; 0: none), which decide how qemu's block layer splits zero writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    align: u64,
    max_transfer: u64,
    opt_write_zero: u64,
    max_write_zero: u64,
}

impl Limits {
    /// The limits of a blkdebug node's options (`o` relative to it).
    pub(crate) fn from_options(o: &OptionList) -> AnyResult<Limits> {
        let get = |k: &str| -> AnyResult<u64> {
            o.get(k).map_or(Ok(0), |v| {
                diskimg::parse_size(v).map_err(|_| anyhow!("Parameter '{k}' expects a size"))
            })
        };
        Ok(Limits {
            align: get("align")?,
            max_transfer: get("max-transfer")?,
            opt_write_zero: get("opt-write-zero")?,
            max_write_zero: get("max-write-zero")?,
        })
    }

    /// True when no limit is set.
    pub(crate) fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// qemu's bounce-buffer bound for zero writes that fall back to writes.
const MAX_BOUNCE_BUFFER: u64 = 32768 << 9;

/// A blkdebug node over `inner` (its block device is `Filtered<Blkdebug>`).
#[derive(Debug)]
pub(crate) struct Blkdebug {
    inner: Arc<dyn BlockDevice>,
    state: Mutex<State>,
    limits: Limits,
}

impl Blkdebug {
    /// Wraps `inner` with `rules` and request `limits`.
    pub(crate) fn new(inner: Arc<dyn BlockDevice>, rules: Vec<Rule>, limits: Limits) -> Self {
        // Rules on the `none` event are active from the start, newest first.
        let active = (0..rules.len())
            .rev()
            .filter(|&i| rules.get(i).is_some_and(|r| r.event == "none"))
            .collect();
        Self {
            inner,
            state: Mutex::new(State { rules, active }),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises `event`: its rules become the active ones (qemu's `process_rule`).
    pub(super) fn event(&self, event: &str) {
        let mut s = self.lock();
        let hit: Vec<usize> = (0..s.rules.len())
            .filter(|&i| s.rules.get(i).is_some_and(|r| r.event == event))
            .collect();
        if !hit.is_empty() {
            s.active = hit.into_iter().rev().collect();
        }
    }

    /// Fails a request of `len` bytes at `offset` as the first matching active rule says.
    fn check(&self, offset: u64, len: u64, ty: IoType) -> Result<()> {
        let mut s = self.lock();
        let found = s.active.iter().position(|&i| {
            s.rules.get(i).is_some_and(|r| {
                r.iotypes & (1 << ty as u32) != 0
                    && r.offset
                        .is_none_or(|o| len > 0 && o >= offset && o - offset < len)
            })
        });
        let Some(pos) = found else { return Ok(()) };
        let Some(rule) = s.active.get(pos).and_then(|&i| s.rules.get(i)).cloned() else {
            return Ok(());
        };
        if rule.errno == 0 {
            return Ok(());
        }
        if rule.once {
            s.active.remove(pos);
        }
        Err(std::io::Error::from_raw_os_error(rule.errno).into())
    }

    /// One piece of a split zero write: blkdebug passes pieces of at least its zero
    /// alignment on; smaller ones fall back to writes of zeroes, as in qemu (which is how
    /// its tests exercise the fallback).
    fn zero_piece(&self, offset: u64, len: u64, align: u64, flags: ZeroFlags) -> Result<u64> {
        if len >= align {
            self.check(offset, len, IoType::WriteZeroes)?;
            self.inner.write_zeroes(offset, len, flags)?;
            return Ok(len);
        }
        let max_transfer = match self.limits.max_transfer {
            0 => MAX_BOUNCE_BUFFER,
            m => m.min(MAX_BOUNCE_BUFFER),
        };
        let n = len.min(max_transfer);
        let zeroes = vec![0u8; usize::try_from(n).unwrap_or(0)];
        self.check(offset, n, IoType::Write)?;
        self.inner.write_at(&zeroes, offset)?;
        Ok(n)
    }
}

impl Filter for Blkdebug {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, IoType::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, IoType::Write)?;
        self.inner.write_compressed(buf, offset)
    }
    /// Splits as qemu's `bdrv_co_do_pwrite_zeroes` does for this node's limits: a head
    /// up to the zero alignment, the aligned bulk in pieces of at most `max-write-zero`
    /// (rounded down to the alignment), then the tail.
    fn write_zeroes(&self, mut offset: u64, mut len: u64, flags: ZeroFlags) -> Result<()> {
        let align = self.limits.align.max(self.limits.opt_write_zero).max(1);
        let max = match self.limits.max_write_zero {
            0 => u64::MAX / 2,
            m => m,
        };
        let max = (max - max % align).max(align);
        let max_transfer = match self.limits.max_transfer {
            0 => MAX_BOUNCE_BUFFER,
            m => m.min(MAX_BOUNCE_BUFFER),
        };
        let mut head = offset % align;
        let tail = offset.saturating_add(len) % align;
        while len > 0 {
            let mut num = len;
            if head > 0 {
                num = len.min(max_transfer).min(align - head);
                head = (head + num) % align;
            } else if tail > 0 && num > align {
                num -= tail;
            }
            num = num.min(max);
            let done = self.zero_piece(offset, num, align, flags)?;
            offset += done;
            len -= done;
        }
        Ok(())
    }
    fn map(&self, offset: u64, len: u64) -> Result<diskimg::blockio::Extent> {
        self.check(offset, len, IoType::BlockStatus)?;
        self.inner.map(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, IoType::Discard)?;
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.check(0, 0, IoType::Flush)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rules_fire_after_their_event() {
        let rules = parse_config(
            "[inject-error]\nevent = \"cor_write\"\nsector = \"2048\"\nonce = \"on\"\n",
        )
        .unwrap();
        let dev = super::super::filter::Filtered(Blkdebug::new(
            Arc::new(crate::nodes::NullDevice::new(4 << 20)),
            rules,
            Limits::default(),
        ));
        let mut buf = vec![0u8; 4096];
        // Not active before the event.
        dev.read_at(&mut buf, 1 << 20).unwrap();
        dev.event("cor_write");
        // Outside the sector: passes; over it: EIO, once.
        dev.write_at(&buf, 2 << 20).unwrap();
        let e = dev.write_at(&buf, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("Input/output error"), "{e}");
        dev.write_at(&buf, 1 << 20).unwrap();
    }

    #[test]
    fn unsupported_rules_are_refused() {
        for text in [
            "[inject-error]\nevent = \"l1_update\"\n",
            "[inject-error]\nevent = \"cor_write\"\nstate = \"1\"\n",
        ] {
            let e = parse_config(text).unwrap_err().to_string();
            assert!(e.contains("not supported by diskimg"), "{text}: {e}");
        }
        let mut o = OptionList::new();
        o.set("inject-error.0.event", "cor_write");
        o.set("inject-error.0.errno", "28");
        assert_eq!(option_rules(&o).unwrap().len(), 1);
        o.set("set-state.0.event", "read_aio");
        o.set("set-state.0.new_state", "42");
        assert_eq!(option_rules(&o).unwrap().len(), 1);
        o.set("inject-error.1.event", "write_aio");
        assert!(option_rules(&o).is_err());
        let set_state = "[set-state]\nevent = \"read_aio\"\nnew_state = \"2\"\n";
        assert!(parse_config(set_state).unwrap().is_empty());
    }
}
