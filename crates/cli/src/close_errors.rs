//! Errors while an image closes, in qemu-img's words: a persistent bitmap that could not
//! be stored (qcow2 writes its bitmaps back at close; qemu's `qcow2_inactivate`) is
//! reported as "Lost persistent bitmaps during inactivation of node '…': …", and the
//! verb fails with "Error while closing the image: Invalid argument" (qemu's
//! `bdrv_inactivate_all` returns `EINVAL`). qemu tries to store the bitmaps twice (when
//! it inactivates the image, and again when it closes it, since the inactivation failed),
//! so the "Lost" line appears twice; diskimg stores once and prints qemu's lines.

use diskimg::Error as E;

use crate::common::prog;

/// The generated node name qemu shows (its `#blockNNN`; iotests filter it out).
const NODE: &str = "#block113";

/// qemu's "Lost persistent bitmaps …" line for `e`, when it is a bitmap store failure.
pub(crate) fn lost_bitmaps(e: &E) -> Option<String> {
    match e {
        E::Io { context, source } if context.starts_with("Failed to write bitmap '") => {
            Some(format!(
                "Lost persistent bitmaps during inactivation of node '{NODE}': {context}: {}",
                crate::errmap::os_error_text(source)
            ))
        }
        _ => None,
    }
}

/// Reports a bitmap store failure at close as qemu-img's `commit` does (both "Lost"
/// lines, then the close error); false when `e` is another error.
pub(crate) fn report_commit(e: &E) -> bool {
    report(e, &[true, true, false])
}

/// Reports a bitmap store failure at close as qemu-img's `bitmap` does (the close
/// error between the two "Lost" lines); false when `e` is another error.
pub(crate) fn report_bitmap(e: &E) -> bool {
    report(e, &[true, false, true])
}

/// Prints "Lost" lines (true) and the close error (false) in `order`.
fn report(e: &E, order: &[bool]) -> bool {
    let Some(lost) = lost_bitmaps(e) else {
        return false;
    };
    let p = prog();
    for &l in order {
        match l {
            true => eprintln!("{p}: {lost}"),
            false => eprintln!("{p}: Error while closing the image: Invalid argument"),
        }
    }
    true
}
