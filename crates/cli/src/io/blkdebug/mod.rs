//! qemu's `blkdebug` driver for qemu-io and qemu-img: error-injection rules
//! ([`rules`]: `[inject-error]`/`[set-state]` from a config file or options, qemu-io's
//! breakpoints, [`breaks`]) that make requests fail, or wait, once their event has happened.
//!
//! A blkdebug node sits either above a format ([`Blkdebug`], a filter over the opened
//! image: the events raised there are the generic block layer's, `cor_write` from
//! [`super::layers::CopyOnRead`]) or below one ([`BlkdebugStorage`], the storage the
//! format reads and writes: the format raises its internal events on it, `l1_update`,
//! `write_aio`, …, through [`diskimg::Storage::debug_event`]), as in qemu
//! (`block/blkdebug.c`).

use std::sync::Arc;

use anyhow::{Result as AnyResult, anyhow};
use diskimg::blockio::ZeroFlags;
use diskimg::{BlockDevice, OptionList, Result};

use super::filter::Filter;

mod breaks;
pub(crate) mod rules;
mod storage;
mod tracked;

pub(crate) use rules::{Engine, IoType, Rule, option_rules, parse_config};
pub(crate) use storage::BlkdebugStorage;

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
        let align = get("align")?;
        if align != 0 && (align >= i32::MAX as u64 || !align.is_power_of_two()) {
            return Err(anyhow!("Cannot meet constraints with align {align}"));
        }
        Ok(Limits {
            align,
            max_transfer: get("max-transfer")?,
            opt_write_zero: get("opt-write-zero")?,
            max_write_zero: get("max-write-zero")?,
        })
    }

    /// The request alignment (`align`; 0: none).
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// True when no limit is set.
    pub(crate) fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// The rules of a blkdebug config file (none for an empty name).
pub(crate) fn config_rules(config: &str) -> AnyResult<Vec<Rule>> {
    if config.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(config)
        .map_err(|e| anyhow!("Could not read blkdebug config file: {e}"))?;
    parse_config(&text)
}

/// The rules of a blkdebug node's options (`o` relative to it): `inject-error.N.*`,
/// `set-state.N.*` and those of its `config` file.
pub(crate) fn node_rules(o: &OptionList) -> AnyResult<Vec<Rule>> {
    let mut rules = option_rules(o)?;
    rules.extend(config_rules(o.get("config").unwrap_or(""))?);
    Ok(rules)
}

/// The facade's driver for blkdebug nodes inside `json:{…}` backing file names
/// ([`diskimg::ImageOptions::node_drivers`]): the node's rules and alignment over the
/// storage of its `image` child.
pub(crate) fn node_drivers() -> diskimg::NodeDrivers {
    let open: diskimg::NodeDriver = Arc::new(|o: &OptionList| {
        let invalid = |e: anyhow::Error| diskimg::Error::invalid(crate::message(&e));
        let rules = node_rules(o).map_err(invalid)?;
        let align = Limits::from_options(o).map_err(invalid)?.align;
        let engine = Arc::new(Engine::new(rules));
        Ok(diskimg::FilterNode {
            child: "image".into(),
            wrap: Arc::new(move |s| Arc::new(BlkdebugStorage::new(s, engine.clone(), align))),
        })
    });
    diskimg::NodeDrivers(vec![("blkdebug".into(), open)])
}

/// qemu's bounce-buffer bound for zero writes that fall back to writes.
const MAX_BOUNCE_BUFFER: u64 = 32768 << 9;

/// A blkdebug node over `inner` (its block device is `Filtered<Blkdebug>`).
#[derive(Debug)]
pub(crate) struct Blkdebug {
    inner: Arc<dyn BlockDevice>,
    engine: Arc<Engine>,
    limits: Limits,
}

impl Blkdebug {
    /// Wraps `inner` with `rules` and request `limits`.
    pub(crate) fn new(inner: Arc<dyn BlockDevice>, rules: Vec<Rule>, limits: Limits) -> Self {
        Self {
            inner,
            engine: Arc::new(Engine::new(rules)),
            limits,
        }
    }

    /// The node's rule engine (qemu-io's breakpoints go there).
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Raises `event` on the node.
    pub(super) fn event(&self, event: diskimg::blockio::DebugEvent) {
        self.engine.event(event);
    }

    fn check(&self, offset: u64, len: u64, ty: IoType) -> Result<()> {
        self.engine.check(offset, len, ty)
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
    use diskimg::blockio::DebugEvent;

    #[test]
    fn filter_rules_fire_after_their_event() {
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
        dev.read_at(&mut buf, 1 << 20).unwrap();
        dev.event(DebugEvent::CorWrite);
        dev.write_at(&buf, 2 << 20).unwrap();
        let e = dev.write_at(&buf, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("Input/output error"), "{e}");
        dev.write_at(&buf, 1 << 20).unwrap();
    }
}
