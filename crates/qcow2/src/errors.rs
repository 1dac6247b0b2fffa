//! qcow2's error constructors for the taxonomy's `Internal` (a broken invariant inside
//! this crate, [`internal`]) and `NotThisFormat` (bytes that are not a qcow2 image at all,
//! [`not_qcow2`]). Damaged images use [`Error::corrupt`] with the file offset; caller
//! mistakes [`Error::invalid`] with qemu's words (the CLI prints every message as it is,
//! or through its one mapping in `errmap.rs`).

use diskimg_blockio::Error;

/// A broken invariant (an index or length this crate computed itself): a bug, not a
/// problem with the image or the call.
pub(crate) fn internal(what: &'static str) -> Error {
    Error::internal(what)
}

/// Not a qcow2 image (bad magic at offset 0, or too short for a header), with qemu's
/// words.
pub(crate) fn not_qcow2() -> Error {
    Error::not_format("qcow2", "Image is not in qcow2 format", 0)
}
