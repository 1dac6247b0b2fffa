//! Flags that mean the same in several verbs, declared once. A verb flattens each where
//! it stood in its own list (`#[command(flatten)] quiet: QuietArg`): clap lists a
//! flattened flag in place, so `--help` reads as before. A verb whose flag says
//! something else (`create -f` defaults to raw, `convert -f` is `--source-format`,
//! `snapshot -U` only goes with `-l`) keeps its own declaration.

use anyhow::Result;
use diskimg::Format;

use crate::common::{opt_format, parse_output};

/// `-f`/`--format`: the image's format, probed when omitted.
#[derive(clap::Args, Debug)]
pub(crate) struct FormatArg {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    pub(crate) format: Option<String>,
}

impl FormatArg {
    /// The format given for `file` (`None`: probe it); an unknown name is qemu-img's
    /// "Unknown driver" error.
    pub(crate) fn of(&self, file: &str) -> Result<Option<Format>> {
        opt_format(self.format.as_deref(), file)
    }
}

/// `--output`: human or json.
#[derive(clap::Args, Debug)]
pub(crate) struct OutputArg {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

impl OutputArg {
    /// Whether JSON was asked for (an unknown value is qemu-img's error).
    pub(crate) fn json(&self) -> Result<bool> {
        parse_output(&self.output)
    }
}

/// `-q`: print nothing on success.
#[derive(clap::Args, Debug)]
pub(crate) struct QuietArg {
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
}

impl QuietArg {
    /// Whether `-q` was given.
    pub(crate) fn on(&self) -> bool {
        self.quiet
    }
}

/// `-p`: show progress.
#[derive(clap::Args, Debug)]
pub(crate) struct ProgressArg {
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
}

impl ProgressArg {
    /// Whether `-p` was given.
    pub(crate) fn on(&self) -> bool {
        self.progress
    }
}

/// `-U`/`--force-share` of a verb that may open images read-write: accepted, and passed
/// on to every open ([`ForceShareArg::apply`]).
#[derive(clap::Args, Debug)]
pub(crate) struct ForceShareArg {
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

impl ForceShareArg {
    /// Makes the verb's opens share the image as `-U` asks.
    pub(crate) fn apply(&self) {
        crate::common::set_force_share(self.force_share);
    }
}

/// `-U`/`--force-share` of a verb that opens images read-only (as [`ForceShareArg`],
/// with a help line saying so).
#[derive(clap::Args, Debug)]
pub(crate) struct ReadOnlyShareArg {
    /// Accepted for compatibility (images are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

impl ReadOnlyShareArg {
    /// Makes the verb's opens share the image as `-U` asks.
    pub(crate) fn apply(&self) {
        crate::common::set_force_share(self.force_share);
    }
}

/// `-t`: a cache mode the verb accepts and does not apply.
#[derive(clap::Args, Debug)]
pub(crate) struct CacheArg {
    /// Cache mode (accepted).
    #[arg(short = 't')]
    cache: Option<String>,
}

impl CacheArg {
    /// The mode given (accepted, not applied).
    pub(crate) fn mode(&self) -> Option<&str> {
        self.cache.as_deref()
    }
}
