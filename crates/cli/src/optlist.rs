//! qemu-img's `-o` option lists as its verbs read them (`create`, `convert`, `amend`):
//! each `-o` value must be a well-formed list (`Invalid option list: …`), repeated `-o`
//! values are joined with commas, and `help` or `?` as an element of the joined list
//! (not inside a value: `backing_file=a,,help` names the file `a,help`) prints the
//! option help instead of running the verb.

use anyhow::{Result, bail};

/// qemu's `is_valid_option_list`: not empty, no leading comma, and trailing commas only
/// in escaped pairs.
fn is_valid(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// Checks every `-o` value as qemu-img does while it reads its options.
pub(crate) fn check(lists: &[String]) -> Result<()> {
    for l in lists {
        if !is_valid(l) {
            bail!("Invalid option list: {l}");
        }
    }
    Ok(())
}

/// qemu's `has_help_option` over the joined `-o` values: an element (up to an unescaped
/// comma) that is `help` or `?`.
pub(crate) fn wants_help(lists: &[String]) -> bool {
    let joined = lists.join(",");
    let mut element = String::new();
    let mut chars = joined.chars().peekable();
    loop {
        match chars.next() {
            Some(',') if chars.peek() == Some(&',') => {
                chars.next();
                element.push(',');
            }
            Some(',') | None => {
                if element == "help" || element == "?" {
                    return true;
                }
                element.clear();
                if chars.peek().is_none() {
                    return false;
                }
            }
            Some(c) => element.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn lists_and_help_as_qemu_img() {
        assert!(wants_help(&v(&["help"])));
        assert!(wants_help(&v(&["?,cluster_size=4k"])));
        assert!(wants_help(&v(&["cluster_size=4k", "help"])));
        assert!(wants_help(&v(&["cluster_size=4k,help"])));
        assert!(!wants_help(&v(&["backing_file=a,,help"])));
        assert!(!wants_help(&v(&["backing_file=a,,?"])));
        assert!(!wants_help(&v(&["cluster_size=4k"])));
        assert!(check(&v(&["backing_file=a,"])).is_err());
        assert!(check(&v(&[",help"])).is_err());
        assert!(check(&v(&[",,"])).is_err());
        assert!(check(&v(&[""])).is_err());
        assert!(check(&v(&["backing_file=a,,", "help"])).is_ok());
    }
}
