//! The second opinion: diskimg's own driver opens the image (read-only, metadata only,
//! every other file denied and recorded). A driver that refuses the image, or that asks
//! for a file the inspector did not list, makes the image unsafe.

use std::sync::{Arc, Mutex};

use diskimg_blockio::{
    Error, FilePurpose, HostFiles, OpenOptions, ReadOnlyStorage, Result, Storage,
};

use super::{InspectOptions, Report};
use crate::format::Format;

/// Denies every file and remembers the names asked for.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<String>>);

impl HostFiles for Recorder {
    fn open(&self, name: &str, purpose: FilePurpose, _w: bool) -> Result<Arc<dyn Storage>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        Err(Error::BackingDenied {
            path: name.to_string(),
            purpose: purpose.as_str(),
            reason: "inspect opens no other file",
        })
    }
    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
        self.open(name, purpose, true)
    }
}

/// Opens the image with the driver of `format` and compares what it wants with the
/// report.
pub(crate) fn cross_check(
    storage: Arc<dyn Storage>,
    format: Format,
    options: &InspectOptions,
    r: &mut Report,
) {
    let Ok(driver) = format.driver() else {
        return;
    };
    let files = Arc::new(Recorder::default());
    let mut opts = OpenOptions::new()
        .read_only(true)
        .limits(options.limits)
        .files(files.clone());
    #[cfg(feature = "qcow2")]
    {
        opts = opts.driver_option(diskimg_qcow2::NO_IO_OPTION, "on");
    }
    let ro: Arc<dyn Storage> = Arc::new(ReadOnlyStorage(storage));
    let known = |r: &Report, name: &str| r.references.iter().any(|x| x.name == name);
    match driver.open(ro, &opts) {
        Ok(dev) => {
            if let Some(b) = dev.info().backing {
                for name in std::iter::once(&b.filename).chain(b.alternates.iter()) {
                    if !name.is_empty() && !known(r, name) {
                        r.unsafe_(
                            "driver",
                            format!("diskimg's {format} driver names a parent '{name}' too"),
                        );
                    }
                }
            }
        }
        Err(Error::BackingDenied { .. }) => {}
        Err(e) => r.unsafe_(
            "driver",
            format!("diskimg's {format} driver refuses the image: {e}"),
        ),
    }
    let asked = files.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for name in asked {
        if !known(r, &name) {
            r.unsafe_(
                "driver",
                format!("diskimg's {format} driver asks for the file '{name}' too"),
            );
        }
    }
}
