//! A vhost-user-blk driver for benchmarks and tests: one device over libblkio (crates.io
//! `blkio`, the `virtio-blk-vhost-user` driver fio's libblkio engine and QEMU's
//! `virtio-blk-vhost-user` blockdev use), with one queue and one shared buffer
//! ([`dev::Device`]). The `vhost-client` binary (src/main.rs) benchmarks servers with it;
//! crates/serve's tests drive `diskimg serve`'s export through it as a real client.
#![deny(unsafe_code)]

pub mod dev;
