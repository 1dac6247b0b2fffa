//! qemu's qcow2 runtime options that tune its block layer (metadata cache sizes,
//! `lazy-refcounts`, overlap checks, `cache-clean-interval`, `pass-discard-*`).
//! diskimg's caches and checks are its own, so valid values change nothing here (but
//! `pass-discard-snapshot=off`, read by `Qcow2OpenOptions`); values qemu refuses are refused
//! with qemu's messages, in qemu's order (`qcow2_update_options_prepare`), so a typo is
//! not silently accepted.

use diskimg_blockio::{Error, OptionList, Result, parse_size};

/// qemu's overlap-check modes.
const OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

fn invalid(msg: String) -> Error {
    Error::invalid(msg)
}

/// A size option, with qemu's message for a malformed one.
fn size(d: &OptionList, key: &str) -> Result<Option<u64>> {
    d.get(key)
        .map(|v| {
            parse_size(v).map_err(|_| {
                invalid(format!(
                    "Parameter '{key}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively.\n"
                ))
            })
        })
        .transpose()
}

/// Checks the runtime options of an image with `cluster_size`-byte clusters and
/// `virtual_size` guest bytes (qcow2 version `version`).
pub(crate) fn check(
    d: &OptionList,
    cluster_size: u64,
    virtual_size: u64,
    version: u32,
) -> Result<()> {
    let lazy = match d.get("lazy-refcounts") {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(_) => {
            return Err(invalid(
                "Parameter 'lazy-refcounts' expects 'on' or 'off'".into(),
            ));
        }
    };
    for key in [
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
    ] {
        if d.get(key).is_some_and(|v| v != "on" && v != "off") {
            return Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'")));
        }
    }
    let combined = size(d, "cache-size")?;
    let l2 = size(d, "l2-cache-size")?;
    let refcount = size(d, "refcount-cache-size")?;
    let entry = size(d, "l2-cache-entry-size")?.unwrap_or(cluster_size);
    if let Some(c) = combined {
        if l2.is_some() && refcount.is_some() {
            return Err(invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            ));
        } else if l2.is_some_and(|l| l > c) {
            return Err(invalid("l2-cache-size may not exceed cache-size".into()));
        } else if refcount.unwrap_or(0) > c {
            return Err(invalid(
                "refcount-cache-size may not exceed cache-size".into(),
            ));
        }
    }
    if entry < 512 || entry > cluster_size || !entry.is_power_of_two() {
        return Err(invalid(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster_size})"
        )));
    }
    // An L2 table is one cluster: no cache beyond what the whole disk's tables take.
    let max_l2_cache = virtual_size
        .div_ceil(cluster_size.max(1))
        .saturating_mul(8)
        .next_multiple_of(cluster_size.max(1));
    let int_max = u64::from(i32::MAX.unsigned_abs());
    if l2.is_some_and(|l| l.min(max_l2_cache) > int_max) {
        return Err(invalid("L2 cache size too big".into()));
    }
    if refcount.is_some_and(|r| r > int_max) {
        return Err(invalid("Refcount cache size too big".into()));
    }
    if let Some(v) = d.get("cache-clean-interval") {
        let ok = v.parse::<u64>().ok().filter(|&n| n <= u64::from(u32::MAX));
        if ok.is_none() {
            return Err(invalid("Cache clean interval too big".into()));
        }
    }
    if lazy == Some(true) && version < 3 {
        return Err(invalid(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        ));
    }
    let mode = d.get("overlap-check");
    let template = d.get("overlap-check.template");
    if let (Some(m), Some(t)) = (mode, template)
        && m != t
    {
        return Err(invalid(format!(
            "Conflicting values for qcow2 options 'overlap-check' ('{m}') and 'overlap-check.template' ('{t}')"
        )));
    }
    if let Some(m) = mode.or(template)
        && !OVERLAP_MODES.contains(&m)
    {
        return Err(invalid(format!(
            "Unsupported value '{m}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> OptionList {
        OptionList::parse(s).unwrap()
    }

    #[test]
    fn qemu_refusals() {
        let c = |s: &str| {
            check(&opts(s), 65536, 64 << 20, 3)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(c("cache-size=1M,l2-cache-size=512k"), None);
        assert_eq!(c("overlap-check=cached,lazy-refcounts=on"), None);
        assert!(
            c("cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M")
                .unwrap()
                .contains("may not be set at the same time")
        );
        assert_eq!(
            c("cache-size=1M,l2-cache-size=2M").unwrap(),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            c("cache-size=1M,refcount-cache-size=2M").unwrap(),
            "refcount-cache-size may not exceed cache-size"
        );
        assert!(
            c("l2-cache-entry-size=4242")
                .unwrap()
                .contains("power of two between 512 and the cluster size (65536)")
        );
        assert_eq!(
            c("refcount-cache-size=256T").unwrap(),
            "Refcount cache size too big"
        );
        assert_eq!(
            c("lazy-refcounts=42").unwrap(),
            "Parameter 'lazy-refcounts' expects 'on' or 'off'"
        );
        assert!(
            c("overlap-check=constant,overlap-check.template=all")
                .unwrap()
                .starts_with("Conflicting values")
        );
        assert!(
            c("overlap-check.template=blubb")
                .unwrap()
                .starts_with("Unsupported value 'blubb'")
        );
        assert_eq!(
            c("pass-discard-snapshot=bogus").unwrap(),
            "Parameter 'pass-discard-snapshot' expects 'on' or 'off'"
        );
        assert_eq!(c("pass-discard-snapshot=off,pass-discard-request=on"), None);
        assert_eq!(
            c("cache-clean-interval=-1").unwrap(),
            "Cache clean interval too big"
        );
        // 32 PiB with 256 KiB clusters: 1 TiB of L2 tables fit the setting.
        let big = check(
            &opts("l2-cache-entry-size=512,l2-cache-size=1T"),
            256 << 10,
            32 << 50,
            3,
        );
        assert_eq!(big.unwrap_err().to_string(), "L2 cache size too big");
    }
}
