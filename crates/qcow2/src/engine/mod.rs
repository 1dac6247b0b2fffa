//! The metadata engine: [`meta::Meta`] (the L1 table, the L2 cache and lookups, the
//! header as written), the refcount allocator (`refcount`), clusters reserved ahead of
//! flushes (`reserve`), deferred L2 updates (`deferred`), overlap checks (`overlap`), and
//! refcount-structure rebuilds (`rebuild`), lazy refcounts (`lazy`), emptying from scratch (`empty`), the host epoch
//! (`epoch`); `state` is what the device and features read
//! of it and the named changes they make (Meta's fields are private to the engine). It
//! works on a `&mut Meta` and never names the device; the device (`crate::device`) and
//! the features above it call into it.

pub(crate) mod deferred;
pub(crate) mod empty;
pub(crate) mod epoch;
pub(crate) mod lazy;
pub(crate) mod meta;
pub(crate) mod overlap;
pub(crate) mod punch;
pub(crate) mod rebuild;
pub(crate) mod refcount;
pub(crate) mod reserve;
pub(crate) mod state;
