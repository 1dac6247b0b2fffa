//! Opening images as qemu-img does: `json:`/`blkdebug:` names, special sources, secrets
//! and driver options, the qemu-compatible open policy, `-U`, and qemu's messages.

use anyhow::{Context, Result};
use diskimg::{CacheMode, Format, Image, ImageOptions, OpenPolicy};

/// Opens `file` as qemu-img does: the given or probed format, backing chains followed
/// under [`OpenPolicy::qemu_compatible`] (unless `backing` is false).
/// With `--image-opts`, `file` is an option string (see [`crate::secrets::resolve`]).
pub(crate) fn open_image(
    file: &str,
    format: Option<Format>,
    read_only: bool,
    backing: bool,
) -> Result<Image> {
    open_image_cached(file, format, read_only, backing, CacheMode::default())
}

/// [`open_image`] with every file of the chain in host cache mode `cache` (qemu-nbd's
/// `--cache`), unless a `json:`/`--image-opts` argument sets its own `cache.direct`
/// ([`crate::imgspec::arg_cache`]). Special sources (URLs, `-`) are opened as
/// [`open_image`] opens them only in the default mode.
pub(crate) fn open_image_cached(
    file: &str,
    format: Option<Format>,
    read_only: bool,
    backing: bool,
    cache: CacheMode,
) -> Result<Image> {
    // qemu's `json:{…}` and `blkdebug:` names and `--image-opts` option strings (nested
    // formats, null-co, blkdebug, …).
    if crate::imgspec::is_spec_or_opts(file) {
        let (_, _, opts) = crate::secrets::resolve("", format)?;
        let mut opts = opts
            .with_policy(OpenPolicy::qemu_compatible())
            .with_backing(backing)
            .with_cache(cache);
        opts.read_only = read_only;
        opts.force_share |= FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed);
        let img = crate::imgspec::open_arg(file, format, opts)
            .with_context(|| format!("Could not open '{file}'"))?;
        crate::secrets::warn_legacy_aes(file, &img);
        report_open_repairs(&img);
        return Ok(img);
    }
    // `foo:bar` names a protocol (`Unknown protocol 'foo'`), URLs only read-only sources.
    crate::names::check_protocol(file, read_only && cache == CacheMode::default())
        .with_context(|| format!("Could not open '{file}'"))?;
    let (path, format, opts) = crate::secrets::resolve(file, format)?;
    let opts = opts.with_cache(cache);
    // URLs, `-`, compressed files, archive members (read-only verbs only).
    if read_only
        && cache == CacheMode::default()
        && path == file
        && let Some(img) = crate::source::open_special(file, format, true)?
    {
        return Ok(img);
    }
    open_resolved(file, &path, format, opts, read_only, backing)
}

/// The verb's `-U`/`--force-share` ([`set_force_share`]).
static FORCE_SHARE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records the verb's `-U`/`--force-share`: read-only opens after this let others write
/// the files (qemu's `force-share=on`); a writable open fails with qemu's
/// `force-share=on can only be used with read-only images`. Verbs that open a target
/// after their sources clear it first.
pub(crate) fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the verb's `-U` is in force ([`set_force_share`]).
pub(crate) fn force_share() -> bool {
    FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed)
}

/// qemu creates images through a protocol driver found from the name: `json:{…}` and
/// `foo:bar` name ones it does not have (`Unknown protocol 'json'`, `'foo'`); diskimg
/// refuses every prefix but `file:` rather than create a file of that name
/// ([`diskimg::protocol_of`]).
pub(crate) fn check_create_name(name: &str) -> Result<()> {
    match diskimg::protocol_of(name) {
        None | Some("file") => Ok(()),
        Some(p) => Err(diskimg::protocol_refusal(p).into()),
    }
}

/// The lock permissions the CLI takes on a file it opens itself (`-t unsafe` targets):
/// as the library locks an image of `format`.
pub(crate) fn lock_own_file(
    file: &diskimg::blockio::FileStorage,
    format: Format,
    name: &str,
) -> Result<()> {
    use diskimg::blockio::lock::LockPerms;
    let perms = if format == Format::Raw {
        LockPerms::raw_file(true, false)
    } else {
        LockPerms::format_file(true, false)
    };
    file.lock(perms, name)
        .with_context(|| format!("Could not open '{name}'"))
}

/// Opens `path` with `opts` (secrets, driver options) as [`open_image`] does; errors
/// name `arg`.
pub(crate) fn open_resolved(
    arg: &str,
    path: &str,
    format: Option<Format>,
    opts: ImageOptions,
    read_only: bool,
    backing: bool,
) -> Result<Image> {
    crate::names::check_protocol(arg, read_only)
        .with_context(|| format!("Could not open '{arg}'"))?;
    let mut opts = opts
        .with_policy(OpenPolicy::qemu_compatible())
        .with_backing(backing);
    opts.read_only = read_only;
    opts.force_share |= FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed);
    let img = diskimg::open(path, format, &opts).map_err(|e| {
        // qemu reports a backing loop on its own, not as an open failure of the image.
        if matches!(e, diskimg::Error::BackingLoop { .. }) {
            anyhow::Error::from(e)
        } else {
            anyhow::Error::from(e).context(format!("Could not open '{arg}'"))
        }
    })?;
    crate::secrets::warn_legacy_aes(arg, &img);
    report_open_repairs(&img);
    Ok(img)
}

/// Prints what opening repaired (a dirty qcow2 image's refcounts) to stderr, as qemu's
/// tools do while they open it.
pub(crate) fn report_open_repairs(img: &Image) {
    for layer in img.chain() {
        for m in layer.device.repaired_at_open() {
            eprintln!("{m}");
        }
    }
}

/// Warns as qemu does when a raw image was probed and will be written.
pub(crate) fn warn_probed_raw(file: &str, given: Option<Format>, img: &Image) {
    if given.is_none() && img.format == Format::Raw {
        eprintln!(
            "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions."
        );
    }
}
