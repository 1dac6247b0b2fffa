//! `diskimg serve` started by a client through systemd socket activation, as libnbd's
//! tools start qemu-nbd (`nbdinfo [ qemu-nbd … ]`): the real nbdinfo and nbdcopy, with
//! qemu-nbd started the same way as the oracle.

use diskimg_testutil::{qemu_img_ok, tempdir};

use super::serve::{Served, sample, tool, tool_ok};
use crate::s;

/// A client that does not return in this time hangs on a server that did not exit
/// when the client left (libnbd waits for the server it started).
const LIMIT: &str = "60";

/// `timeout LIMIT CLIENT ARGS… -- [ SERVER SERVE_ARGS… ]`; a missing client fails.
fn activated(client: &str, args: &[&str], server: &[&str], after: &[&str]) -> std::process::Output {
    let mut a = vec![LIMIT, client];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--", "["]);
    a.extend_from_slice(server);
    a.push("]");
    a.extend_from_slice(after);
    let o = tool("timeout", &a);
    assert_ne!(o.status.code(), Some(127), "{client} is not installed");
    assert_ne!(o.status.code(), Some(124), "{client} {a:?} timed out");
    o
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ours<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![env!("CARGO_BIN_EXE_diskimg"), "serve"];
    v.extend_from_slice(args);
    v
}

fn theirs<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["qemu-nbd"];
    v.extend_from_slice(args);
    v
}

#[test]
fn nbdinfo_and_nbdcopy_start_the_server_like_qemu_nbd() {
    let dir = tempdir();
    let img = sample(dir.path(), "qcow2");
    let serve = ["-r", "-f", "qcow2", s(&img)];
    // Size (the server exits when nbdinfo leaves, or the next start finds the image locked).
    let json = ok(
        activated("nbdinfo", &["--json"], &ours(&serve), &[]),
        "nbdinfo --json",
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 16 << 20, "{json}");
    let json = ok(
        activated("nbdinfo", &["--json"], &ours(&serve[1..]), &[]),
        "writable",
    );
    assert!(json.contains("\"export-size\": 16777216"), "{json}");
    // The map equals the one through `-k`, and qemu-nbd's started the same way.
    let map = ok(activated("nbdinfo", &["--map"], &ours(&serve), &[]), "map");
    let q = ok(
        activated("nbdinfo", &["--map"], &theirs(&serve), &[]),
        "qemu map",
    );
    assert_eq!(map, q);
    let srv = Served::diskimg(dir.path(), "k", &serve);
    assert_eq!(map, tool_ok("nbdinfo", &["--map", &srv.uri()]));
    srv.stop();
    // nbdcopy copies the bytes qemu-img convert writes.
    let (out, want) = (dir.path().join("out.raw"), dir.path().join("want.raw"));
    ok(
        activated("nbdcopy", &[], &ours(&serve), &[s(&out)]),
        "nbdcopy",
    );
    qemu_img_ok(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&want)]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
}

#[test]
fn a_socket_address_is_refused_under_activation() {
    let dir = tempdir();
    let img = sample(dir.path(), "qcow2");
    let k = dir.path().join("x.sock");
    let cases: [(&[&str], &str); 4] = [
        (
            &["-k", s(&k)],
            "Unix socket can't be set when using socket activation",
        ),
        (
            &["-p", "10899"],
            "TCP port number can't be set when using socket activation",
        ),
        (
            &["-b", "127.0.0.1"],
            "The interface can't be set when using socket activation",
        ),
        (
            &["--fork"],
            "--fork can't be set when using socket activation",
        ),
    ];
    for (flags, msg) in cases {
        let mut args: Vec<&str> = flags.to_vec();
        args.extend_from_slice(&["-f", "qcow2", s(&img)]);
        let o = activated("nbdinfo", &[], &ours(&args), &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(msg), "{flags:?}: {err}");
        // qemu-nbd says the same (it has no --fork refusal: it forks in place).
        if flags[0] != "--fork" {
            let o = activated("nbdinfo", &[], &theirs(&args), &[]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains(msg),
                "qemu-nbd {flags:?}: {err}"
            );
        }
        assert!(!k.exists());
    }
}
