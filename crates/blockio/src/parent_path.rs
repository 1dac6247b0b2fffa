//! The forms in which formats with parent locators (VHD's W2ku/W2ru/MacX, VHDX's
//! `absolute_win32_path`/`relative_path`) name a parent image: derived lexically, without
//! file-system access, from the name the user gave and the new image's directory.

use std::path::Path;

/// The ways to name one parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentForms {
    /// Normalised absolute POSIX path (`/dir/base.img`), when derivable.
    pub absolute: Option<String>,
    /// POSIX path relative to the image's directory (`base.img`, `../dir/base.img`),
    /// when derivable.
    pub relative: Option<String>,
    /// A Windows absolute path given as such (`C:\dir\base.img`, `\\server\share\…`),
    /// kept verbatim: nothing else is derivable from it here.
    pub windows_absolute: Option<String>,
}

impl ParentForms {
    /// The forms for parent `name` (relative to the new image's directory, or absolute)
    /// of an image in the absolute directory `image_dir` (`None` when unknown).
    pub fn derive(name: &str, image_dir: Option<&Path>) -> Self {
        let dir = image_dir
            .and_then(Path::to_str)
            .filter(|d| d.starts_with('/'));
        if is_windows_absolute(name) {
            return Self {
                windows_absolute: Some(name.to_string()),
                ..Self::default()
            };
        }
        if name.starts_with('/') {
            let abs = format!("/{}", components(name).join("/"));
            let relative = dir.map(|d| relative(d, &abs));
            return Self {
                absolute: Some(abs),
                relative,
                windows_absolute: None,
            };
        }
        Self {
            absolute: dir.map(|d| format!("/{}", components(&format!("{d}/{name}")).join("/"))),
            relative: Some(name.to_string()),
            windows_absolute: None,
        }
    }

    /// The relative form in Windows notation with a leading `.\` unless it starts with
    /// `..\` (as Windows writes relative parent paths).
    pub fn windows_relative(&self) -> Option<String> {
        let win = self.relative.as_ref()?.replace('/', "\\");
        Some(if win.starts_with(".\\") || win.starts_with("..\\") {
            win
        } else {
            format!(".\\{win}")
        })
    }

    /// The absolute form in Windows notation: a Windows path as given, or the POSIX path
    /// with `\` separators (driveless; readers turn it back into the POSIX path).
    pub fn windows_absolute(&self) -> Option<String> {
        self.windows_absolute
            .clone()
            .or_else(|| self.absolute.as_ref().map(|a| a.replace('/', "\\")))
    }
}

/// Lexically normalised path components (`.` dropped, `..` popped).
fn components(path: &str) -> Vec<&str> {
    let mut v: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                v.pop();
            }
            c => v.push(c),
        }
    }
    v
}

/// A Windows absolute path: drive letter (`C:\`, `C:/`) or UNC (`\\server`).
fn is_windows_absolute(name: &str) -> bool {
    let b = name.as_bytes();
    matches!(b, [d, b':', b'\\' | b'/', ..] if d.is_ascii_alphabetic()) || name.starts_with("\\\\")
}

/// The relative path from directory `from` to file `to` (both absolute POSIX paths).
fn relative(from: &str, to: &str) -> String {
    let (f, t) = (components(from), components(to));
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = Vec::new();
    parts.extend(std::iter::repeat_n("..", f.len() - common));
    parts.extend(t.iter().skip(common));
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, dir: Option<&str>) -> (Option<String>, Option<String>) {
        let p = ParentForms::derive(name, dir.map(Path::new));
        (p.windows_absolute(), p.windows_relative())
    }

    fn some(a: &str, r: &str) -> (Option<String>, Option<String>) {
        (Some(a.to_string()), Some(r.to_string()))
    }

    #[test]
    fn forms() {
        let d = Some("/img/vms");
        assert_eq!(
            f("base.vhd", d),
            some("\\img\\vms\\base.vhd", ".\\base.vhd")
        );
        assert_eq!(
            f("./sub/b.vhd", d),
            some("\\img\\vms\\sub\\b.vhd", ".\\sub\\b.vhd")
        );
        assert_eq!(f("../b.vhd", d), some("\\img\\b.vhd", "..\\b.vhd"));
        assert_eq!(
            f("/data/./x/../base.vhd", d),
            some("\\data\\base.vhd", "..\\..\\data\\base.vhd")
        );
        assert_eq!(
            f("/img/vms/base.vhd", d),
            some("\\img\\vms\\base.vhd", ".\\base.vhd")
        );
        assert_eq!(f("/b.vhd", Some("/")), some("\\b.vhd", ".\\b.vhd"));
        assert_eq!(
            f("sub/b.vhd", None),
            (None, Some(".\\sub\\b.vhd".to_string()))
        );
        assert_eq!(f("/a/b.vhd", None), (Some("\\a\\b.vhd".to_string()), None));
        assert_eq!(
            f("C:\\vms\\b.vhd", d),
            (Some("C:\\vms\\b.vhd".to_string()), None)
        );
        // A relative image directory is not used.
        assert_eq!(
            f("b.vhd", Some("rel")),
            (None, Some(".\\b.vhd".to_string()))
        );
    }
}
