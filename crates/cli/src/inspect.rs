//! `inspect [-f FMT] [--output=human|json] FILE`: is an untrusted image safe to use?
//!
//! Reads only FILE's own bytes (never a backing file, data file, extent or parent) and
//! prints a verdict with its reasons (`diskimg::inspect`). Exit status: 0 safe, 1 unsafe,
//! 2 cannot tell (also when FILE cannot be read). The JSON fields are documented in
//! docs/security.md.

use anyhow::Result;
use diskimg::{InspectOptions, Report, Verdict};
use serde_json::{Value, json};

use crate::args::OutputArg;
use crate::common::{human_size, opt_format, out};
use crate::json::pretty;

/// Arguments of `inspect`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The format the image must be (content of another format is unsafe); probed when
    /// omitted.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[command(flatten)]
    output: OutputArg,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let json = a.output.json()?;
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let opts = InspectOptions::default().with_format(format);
    let report = match diskimg::inspect(&a.file, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("diskimg: Could not open '{}': {e}", a.file);
            return Ok(2);
        }
    };
    if json {
        out(&format!("{}\n", pretty(&to_json(&a.file, &report))))?;
    } else {
        out(&human(&a.file, &report))?;
    }
    Ok(match report.verdict {
        Verdict::Safe => 0,
        Verdict::Unsafe => 1,
        Verdict::CannotTell => 2,
    })
}

fn to_json(file: &str, r: &Report) -> Value {
    let sigs: Vec<Value> = r
        .signatures
        .iter()
        .map(|s| json!({"name": s.name, "offset": s.offset}))
        .collect();
    let refs: Vec<Value> = r
        .references
        .iter()
        .map(|x| json!({"kind": x.kind.as_str(), "name": x.name, "detail": x.detail}))
        .collect();
    let findings: Vec<Value> = r
        .findings
        .iter()
        .map(|f| json!({"severity": f.severity.as_str(), "check": f.check, "message": f.message}))
        .collect();
    json!({
        "filename": file,
        "verdict": r.verdict.as_str(),
        "format": r.format,
        "detected-format": r.detected,
        "declared-format": r.declared,
        "virtual-size": r.virtual_size,
        "file-size": r.file_size,
        "signatures": sigs,
        "references": refs,
        "encryption": r.encryption,
        "unknown-features": r.unknown_features,
        "findings": findings,
    })
}

fn human(file: &str, r: &Report) -> String {
    let mut s = format!(
        "image: {file}\nverdict: {}\nformat: {}",
        r.verdict.as_str(),
        r.format
    );
    if r.findings.iter().any(|f| f.check == "format-mismatch") {
        s.push_str(&format!(" (as declared; the content is {})", r.detected));
    }
    s.push('\n');
    if let Some(v) = r.virtual_size {
        s.push_str(&format!("virtual size: {} ({v} bytes)\n", human_size(v)));
    }
    s.push_str(&format!(
        "file size: {} ({} bytes)\n",
        human_size(r.file_size),
        r.file_size
    ));
    if !r.signatures.is_empty() {
        let l: Vec<String> = r
            .signatures
            .iter()
            .map(|x| format!("{} at {}", x.name, x.offset))
            .collect();
        s.push_str(&format!("signatures: {}\n", l.join(", ")));
    }
    if !r.references.is_empty() {
        s.push_str("references:\n");
        for x in &r.references {
            let d = x
                .detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            s.push_str(&format!("    {}: {}{d}\n", x.kind.as_str(), x.name));
        }
    }
    if !r.encryption.is_empty() {
        s.push_str(&format!("encryption: {}\n", r.encryption.join(", ")));
    }
    if !r.findings.is_empty() {
        s.push_str("findings:\n");
        for f in &r.findings {
            s.push_str(&format!(
                "    {}: {}: {}\n",
                f.severity.as_str(),
                f.check,
                f.message
            ));
        }
    }
    s
}
