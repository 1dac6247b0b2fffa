//! Parent locator payloads of differencing disks: which forms to write for a parent name,
//! and how the MacX form decodes.
//!
//! The VHD spec's locators name the parent per platform: `W2ku` (absolute Windows path,
//! UTF-16LE), `W2ru` (relative Windows path, UTF-16LE) and `MacX` (a `file://` URL,
//! UTF-8). Windows (Virtual PC, Hyper-V) writes W2ku and W2ru and resolves the parent
//! through either; we write both whenever the image's directory is known, plus MacX for a
//! POSIX absolute path, so every reader finds a form it understands.

use std::path::Path;

use diskimg_blockio::parent_path::ParentForms;

/// Parent locator platform code: Windows relative path, UTF-16LE ("W2ru").
pub const W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Parent locator platform code: Windows absolute path, UTF-16LE ("W2ku").
pub const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Parent locator platform code: Mac OS X file URL, UTF-8 ("MacX").
pub const MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Percent-encodes a POSIX path for a `file://` URL (RFC 2396: unreserved characters and
/// `/` stay, every other UTF-8 byte becomes `%XX`).
fn url_encode(path: &str) -> String {
    let mut s = String::new();
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Decodes a MacX locator (`file://[localhost]/abs/path`, percent-encoded UTF-8) into a
/// POSIX path; `None` for anything else.
pub fn decode_macx(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
    let rest = text.strip_prefix("file://")?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    if !rest.starts_with('/') {
        return None;
    }
    let b = rest.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The locators (platform code, payload) to write for parent `name` as the user gave it
/// (relative to the new image's directory, or absolute) when that directory is
/// `image_dir` (absolute; `None` when unknown).
///
/// W2ku: the absolute path with `\` separators (a POSIX path stays driveless, as the
/// reader turns it back). W2ru: `.\name`, or the path from `image_dir` to an absolute
/// name (`..\` steps). MacX: `file://` URL of the POSIX absolute path.
pub fn locators_for(name: &str, image_dir: Option<&Path>) -> Vec<(u32, Vec<u8>)> {
    let forms = ParentForms::derive(name, image_dir);
    let utf16 = |s: &str| crate::header::encode_utf16(s, true);
    let mut v = Vec::new();
    if let Some(a) = forms.windows_absolute() {
        v.push((W2KU, utf16(&a)));
    }
    if let Some(r) = forms.windows_relative() {
        v.push((W2RU, utf16(&r)));
    }
    if let Some(a) = &forms.absolute {
        v.push((MACX, format!("file://{}", url_encode(a)).into_bytes()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(v: &[(u32, Vec<u8>)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(c, d)| {
                let code = String::from_utf8_lossy(&c.to_be_bytes()).into_owned();
                let text = if *c == MACX {
                    String::from_utf8_lossy(d).into_owned()
                } else {
                    let u: Vec<u16> = d
                        .chunks_exact(2)
                        .map(|p| u16::from_le_bytes([p[0], p[1]]))
                        .collect();
                    String::from_utf16_lossy(&u)
                };
                (code, text)
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect()
    }

    #[test]
    fn forms_derived_from_either_name() {
        let dir = Some(Path::new("/img/vms"));
        assert_eq!(
            decoded(&locators_for("base.vhd", dir)),
            pairs(&[
                ("W2ku", "\\img\\vms\\base.vhd"),
                ("W2ru", ".\\base.vhd"),
                ("MacX", "file:///img/vms/base.vhd"),
            ])
        );
        assert_eq!(
            decoded(&locators_for("../b ase.vhd", dir)),
            pairs(&[
                ("W2ku", "\\img\\b ase.vhd"),
                ("W2ru", "..\\b ase.vhd"),
                ("MacX", "file:///img/b%20ase.vhd"),
            ])
        );
        assert_eq!(
            decoded(&locators_for("/data/./x/../base.vhd", dir)),
            pairs(&[
                ("W2ku", "\\data\\base.vhd"),
                ("W2ru", "..\\..\\data\\base.vhd"),
                ("MacX", "file:///data/base.vhd"),
            ])
        );
        // Unknown directory: only the form given.
        assert_eq!(
            decoded(&locators_for("sub/base.vhd", None)),
            pairs(&[("W2ru", ".\\sub\\base.vhd")])
        );
        assert_eq!(
            decoded(&locators_for("/a/base.vhd", None)),
            pairs(&[("W2ku", "\\a\\base.vhd"), ("MacX", "file:///a/base.vhd")])
        );
        assert_eq!(
            decoded(&locators_for("C:\\vms\\base.vhd", dir)),
            pairs(&[("W2ku", "C:\\vms\\base.vhd")])
        );
    }

    #[test]
    fn macx_decoding() {
        assert_eq!(
            decode_macx(b"file:///img/b%20ase.vhd").as_deref(),
            Some("/img/b ase.vhd")
        );
        assert_eq!(
            decode_macx(b"file://localhost/a/%C3%A9.vhd\0\0").as_deref(),
            Some("/a/\u{e9}.vhd")
        );
        for bad in [
            &b"file://host/a"[..],
            b"/a/b",
            b"file:///a%2",
            b"file:///%ff",
            b"\xff",
        ] {
            assert_eq!(decode_macx(bad), None, "{bad:?}");
        }
    }
}
