//! Errors while an image closes, in qemu-img's words: a persistent bitmap that could not
//! be stored (qcow2 writes its bitmaps back at close; qemu's `qcow2_inactivate`) is
//! reported as "Lost persistent bitmaps during inactivation of node '…': …", and the
//! verb fails with "Error while closing the image: Invalid argument" (qemu's
//! `bdrv_inactivate_all` returns `EINVAL`). qemu tries to store the bitmaps twice (when
//! it inactivates the image, and again when it closes it, since the inactivation failed),
//! so the "Lost" line appears twice; diskimg stores once and prints qemu's lines.
//!
//! When the verb's operation failed as well, qemu-img reports both: `bitmap` prints the
//! operation's error at once and the close error after it ([`finish_bitmap`]); `commit`
//! prints the "Lost" lines (from the close) and then the operation's error, without
//! "Error while closing" ([`finish_commit`]).

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

/// `commit`'s outcome as qemu-img's `img_commit` reports it, from the operation's result
/// `done` and the close's `closed`: a bitmap store failure at close prints both "Lost"
/// lines, then the operation's error if it failed (returned, for `main` to print), else
/// the close error (exit 1). Another close error counts only when the operation succeeded.
pub(crate) fn finish_commit(
    done: anyhow::Result<()>,
    closed: diskimg::Result<()>,
) -> anyhow::Result<i32> {
    match (done, closed) {
        (done, Ok(())) => done.map(|()| 0),
        (Err(op), Err(e)) => {
            report(&e, &[true, true]);
            Err(op)
        }
        (Ok(()), Err(e)) => match report(&e, &[true, true, false]) {
            true => Ok(1),
            false => Err(e.into()),
        },
    }
}

/// `bitmap`'s outcome as qemu-img's `img_bitmap` reports it, from the operations' result
/// `done` and the close's `closed`: the operation's error first (printed here when the
/// close failed too), then a bitmap store failure at close as the close error between
/// the two "Lost" lines (exit 1).
pub(crate) fn finish_bitmap(
    done: diskimg::Result<()>,
    closed: diskimg::Result<()>,
) -> anyhow::Result<i32> {
    let e = match (done, closed) {
        (done, Ok(())) => return done.map(|()| 0).map_err(Into::into),
        (Err(op), Err(e)) if lost_bitmaps(&e).is_some() => {
            eprintln!("{}: {}", prog(), crate::errmap::message(&op.into()));
            e
        }
        (Err(op), Err(_)) => return Err(op.into()),
        (Ok(()), Err(e)) => e,
    };
    match report(&e, &[true, false, true]) {
        true => Ok(1),
        false => Err(e.into()),
    }
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
