//! qcow2's error constructors for the two kinds [`Error::invalid`] is not for: a broken
//! invariant inside this crate ([`internal`]) and bytes that are not a qcow2 image at all
//! ([`not_qcow2`]). Damaged images use [`Error::corrupt`] with the file offset; caller
//! mistakes [`Error::invalid`] with qemu's words.

use diskimg_blockio::Error;

/// A broken invariant (an index or length this crate computed itself): a bug, not a
/// problem with the image or the call.
pub(crate) fn internal(what: &'static str) -> Error {
    Error::invalid(what)
}

/// Not a qcow2 image (bad magic, or too short for a header), with qemu's words.
pub(crate) fn not_qcow2() -> Error {
    Error::invalid("Image is not in qcow2 format")
}
